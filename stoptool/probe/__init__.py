"""Frozen-feature probes (paper §5): the options (`config`), features and their cache
(`features`), logistic regression, a torch linear layer and k-NN (`logreg`, `linear`, `knn`),
and the command (`run`). Nothing is imported here, so that reading the options loads neither
timm nor scikit-learn."""
