"""The controller's ground floor: its error tree, durable file writes and the repository lock,
file-keyed memos, the progress interface of long work. It imports only ``agent.base`` (the
atomic write both programs share); every other package may import it.
"""
