"""The controller's ground floor: its error tree, durable file writes and the repository lock,
file-keyed memos. It imports nothing of ours; every other package may import it.
"""
