"""Token generation helpers: sampling, stop strings and incremental detokenization.

- :class:`SamplingParams` / :class:`Sampler`: turn next-position logits into tokens
  (penalties, greedy or temperature / top-k / top-p / min-p sampling, seeded).
- :class:`StopStringMatcher`: cut streamed text at stop strings without ever emitting
  part of one.
- :class:`IncrementalDetokenizer`: turn a token stream into text deltas that never
  split a multi-byte character.
"""

from __future__ import annotations

from lpipes.generation.detokenize import IncrementalDetokenizer
from lpipes.generation.sampling import Sampler, SampleResult, SamplingParams, SamplingParamsError
from lpipes.generation.stop import StopStringMatcher

__all__ = [
    "IncrementalDetokenizer",
    "SampleResult",
    "Sampler",
    "SamplingParams",
    "SamplingParamsError",
    "StopStringMatcher",
]
