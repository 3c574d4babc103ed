"""`stoptool evaluate`: suites of frozen-encoder evaluations laid out as the paper's tables
(Table 4's transfer probes, Table 1's ImageNet columns), for stoptool checkpoints and timm
baselines alike."""
