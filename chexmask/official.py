"""The official CheXmask model: its name in the index and its checkpoint's checksum.

Here, not beside the weights code, so commands that only name the model (importing
the published masks) need not import torch.
"""

OFFICIAL_MODEL = "hybridgnet-official"
OFFICIAL_WEIGHTS_SHA256 = "b76bbb8c8ad9774cdf3ac81c9edf04bcc800b3c7f7eacf24ce7249038f3c640f"
