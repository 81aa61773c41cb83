"""Generation engines behind one interface: the opponent writes the synthetic responses.

    engine.generate(prompts, sampling)  token-id prompts (answered_prompt_ids) -> completions
    engine.load_weights(named_tensors)  new weights in memory, no restart
    engine.close()
"""

from spin_fast.generation.base import Completion, Engine, SamplingConfig

__all__ = ["Completion", "Engine", "SamplingConfig"]
