"""The ``edgectl`` command groups: parsers and handlers that call into the subsystems and print.
Imports every subsystem; none imports it. ``controller.cli`` assembles them.
"""
