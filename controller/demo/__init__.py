"""``make demo`` (``python -m controller.demo``): the whole story of edgefleet on one machine.

``story`` runs it (the ``Demo`` steps and the command line), ``digits`` is the model it
trains and writes, ``process`` runs the commands it prints and waits on them. It drives
real ``edgectl`` and ``edge-agent`` processes, so besides agent.contracts and agent.base it
imports agent.client (inference over the agents' sockets) and agent.update.journal (their
install phases); no other controller module imports it.
"""
