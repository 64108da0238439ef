"""deploy-azure, status-azure, logs-azure and destroy-azure: one deployment on an Azure VM.

cli (what the user sees) -> deployment (options, prepare; pure) -> target (the per-target interface)
-> provision / remote (the SDK calls), with arm (request bodies), plan (shown before anything happens),
sizes (prices, memory, fit), credentials, errors and state beside them.
"""
