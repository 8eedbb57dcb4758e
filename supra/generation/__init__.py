"""Generation: chunked prefill, then recurrent decode with a fixed-size state; sampling."""

from supra.generation.generate import generate, prepared_caches
from supra.generation.sampling import apply_repetition_penalty, filter_top_k, filter_top_p, sample_next

__all__ = ["apply_repetition_penalty", "filter_top_k", "filter_top_p", "generate", "prepared_caches", "sample_next"]
