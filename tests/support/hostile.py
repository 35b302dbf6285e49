"""Hostile inputs shared by the tiers (torch-free): a YAML alias bomb and realistic secret shapes."""

import string

from hypothesis import strategies as st

# Hugging Face user tokens, AWS access key ids and secret access keys, as they are issued.
HF_TOKEN_SHAPE = st.text(string.ascii_letters, min_size=34, max_size=34).map("hf_".__add__)
AWS_KEY_ID_SHAPE = st.text(string.ascii_uppercase + string.digits, min_size=16, max_size=16).map("AKIA".__add__)
AWS_SECRET_SHAPE = st.text(string.ascii_letters + string.digits + "+/", min_size=40, max_size=40)
SECRET_SHAPES = st.one_of(HF_TOKEN_SHAPE, AWS_KEY_ID_SHAPE, AWS_SECRET_SHAPE)

# Fixed examples of the same shapes, for tests that are not property tests.
HF_TOKEN = "hf_QmVxZnRrWkRyYmNhTnVwYkdSeWFXVnRh"
AWS_KEY_ID = "AKIAZ7QK2M4XJ8PB3V6N"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY"


def alias_bomb(levels: int = 7, width: int = 10) -> tuple[str, int]:
    """YAML mapping lines whose last anchor `&l{levels-1}` expands to width**levels leaves; (text, leaves).

    Each line is a list of `width` aliases of the line before, so the text grows by one line per
    tenfold expansion.
    """
    lines = [f"l0: &l0 [{','.join('x' * width)}]"]
    lines += [f"l{i}: &l{i} [{','.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n", width**levels


def bomb_job(indent: str = "      ") -> str:
    """A CompressionJob whose recipe.modifiers hold an alias bomb of 10^7 leaves under a quantizer's ignore."""
    bomb, _ = alias_bomb()
    return (
        "apiVersion: modelpress.dev/v1alpha1\nkind: CompressionJob\nmetadata: {name: bomb}\nspec:\n"
        "  model: {uri: /models/tiny}\n  output: {uri: /tmp/out}\n  recipe:\n    modifiers:\n"
        + "".join(indent + line + "\n" for line in bomb.splitlines())
        + indent + "quant_stage: {quant_modifiers: {QuantizationModifier: {scheme: W4A16, ignore: *l6}}}\n"
    )
