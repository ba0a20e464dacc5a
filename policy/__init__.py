"""The emotion-management policy: decision rules, safety, bandit state, DP release of statistics, federated prior, expression."""
