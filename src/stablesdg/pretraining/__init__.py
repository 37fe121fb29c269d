"""The networks pretrained offline on a surface corpus (the stand-in for web-scale data), never on a project's
own images: the corpus loaders (`corpus`), the diffusion prior (`prior`), the FID feature network
(`feature_net`) and the classifier backbone (`backbone`). Their commands live in `commands/prior.py` and
`commands/pretrain.py`."""
