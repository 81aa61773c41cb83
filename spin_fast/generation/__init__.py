"""Generation engines behind one interface: the opponent writes the synthetic responses.

    engine.generate(prompts, sampling)  token-id prompts (from data.render_prompt) -> completions
    engine.load_weights(named_tensors)  new weights in memory, no restart
    engine.close()
"""

from spin_fast.generation.base import Completion, Engine, SamplingConfig

__all__ = ["Completion", "Engine", "SamplingConfig"]
