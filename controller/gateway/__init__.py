"""Site gateways: the configs ``edgectl gateway config`` writes (an nginx caching mirror of
the repository and a mosquitto bridged to the central broker). Imports base, agent.contracts.
"""
