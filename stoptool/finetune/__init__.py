"""Fine-tuning an encoder end to end with a linear head (`stoptool finetune`, the paper's
Table 5): `config` (options and presets), `model` (the encoder a checkpoint holds, as a timm
classifier, and its layer-decay optimizer), `data` (timm's transforms and Mixup), `step`,
`evaluation` (top-1, top-5), `run` (the command, on pretraining's engine) and `bench`."""
