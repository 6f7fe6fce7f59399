"""The signed TUF repository: roles and keys, the key ceremony, releases, history, expiry.
Imports build (bundle files), fleet (store rows), identity, base, agent.contracts/base.
"""
