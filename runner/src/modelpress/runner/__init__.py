"""The runner: one compression job from spec to result, and the engine it drives."""
