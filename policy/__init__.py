"""The emotion-management policy: decision rules and safety, bandit state, the DP release of its statistics, the federated prior, expression."""
