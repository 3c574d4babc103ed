"""The paper's figures from any checkpoint or run: each module computes its numbers in one
function and draws them in another, and `make_*` ties the two to files for the CLI.

similarity (Fig. 5), heatmap (Fig. 6), masks (multi-block masks on an image),
curves (Fig. 4).
"""
