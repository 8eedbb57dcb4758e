"""supra: turn pretrained softmax-attention LLMs into linear-attention RNNs (SUPRA)."""

import logging

__version__ = "0.1.0"


class _SkipTorchaoExtensionNotice(logging.Filter):
    """Drops torchao's "Skipping import of cpp extensions due to incompatible torch version"
    warning. torchtune 0.6.1 needs torchao < 0.15, whose compiled extensions do not match the
    torch releases supra runs on; supra uses none of them, and the line was the first thing every
    command printed. Every other torchao message passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Skipping import of cpp extensions due to incompatible torch version")


# Installed before anything imports torchao (torchtune does, on import), so it sees the record.
logging.getLogger("torchao").addFilter(_SkipTorchaoExtensionNotice())
