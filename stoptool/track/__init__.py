"""DAVIS 2017 video object segmentation by label propagation (the StoP paper's Table 3).

`davis` reads the release and writes masks in its layout, `propagate` carries the first
frame's masks through a video by patch-feature affinities (DINO's protocol), `metrics` is the
official semi-supervised score (J, F, recall, decay) as pure functions, and `run` is the
`stoptool track` command. Options live in the light `config` module.
"""
