"""chexmask-stream: continuous HybridGNet chest X-ray segmentation in the CheXmask conventions."""

__version__ = "0.1.0"
# Bumped whenever pre- or post-processing changes results; stored with every segmentation.
PIPELINE_VERSION = "2"
