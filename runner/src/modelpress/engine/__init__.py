"""The compression engine: recipes, modifiers, the layer-by-layer pipeline and the checkpoint writer.

It knows nothing of Kubernetes or S3; the runner around it does the I/O.
"""
