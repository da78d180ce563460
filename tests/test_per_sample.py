"""sea_attention.core.estimator.per_sample: running a function one sample (or one run of rows) at a time."""

import pytest
import torch

from sea_attention.core.estimator.per_sample import ALIGNMENT, per_sample, sample_wise


def scan(x, scale, state=None, chunk=4):
    """A function of the kind per_sample wraps: tensors, a tuple, None and plain values in, a tuple out."""
    start = torch.zeros_like(x[:, :1]) if state is None else state[0]
    total = start + x.sum(1, keepdim=True) * scale
    return total * chunk, (total, x.shape[0] * torch.ones_like(total))


def test_per_sample_equals_the_batched_call_and_sees_one_sample_at_a_time():
    x = torch.randn(3, 5)
    state = (torch.randn(3, 1), torch.randn(3, 1))
    seen = []

    def recording(*args, **kwargs):
        seen.append(args[0].shape[0])
        return scan(*args, **kwargs)

    got = per_sample(recording, x, 2.0, state=state, chunk=3)
    out, (total, batch) = got
    want_out, (want_total, _) = scan(x, 2.0, state=state, chunk=3)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(total, want_total)
    assert seen == [1, 1, 1]
    assert bool((batch == 1).all())  # each run saw a batch of one
    assert per_sample(scan, x, 2.0, state=None)[0].shape == (3, 1)  # None goes to every run
    assert per_sample(lambda pair, t: t, (None, x), x).shape == x.shape  # the size is found inside tuples


def test_runs_keep_rows_of_one_sample_together():
    x = torch.arange(12.0).view(6, 2)  # 2 samples x 3 images each
    sizes = []
    out = per_sample(lambda t: (sizes.append(t.shape[0]), t * 2)[1], x, runs=2)
    assert sizes == [3, 3] and torch.equal(out, x * 2)
    with pytest.raises(ValueError, match="leading axis of 6 does not split into 4 equal runs"):
        per_sample(lambda t: t, x, runs=4)


def test_misaligned_runs_are_copied_to_aligned_memory():
    base = torch.randn(3 * 5 + 1)
    x = base[1:].view(3, 5)  # starts 4 bytes past an aligned address; so do all its samples' rows
    assert x.data_ptr() % ALIGNMENT != 0
    pointers = []
    out = per_sample(lambda t: (pointers.append(t.data_ptr()), t + 1)[1], x)
    assert all(p % ALIGNMENT == 0 for p in pointers)
    assert torch.equal(out, x + 1)


def test_one_aligned_run_is_the_call_itself():
    """A batch of one on aligned memory (a decoding step) reaches ``fn`` as given, tuples included; a
    misaligned one is still copied."""
    x, pair = torch.randn(1, 5), (torch.randn(1, 2), None)
    seen = []
    per_sample(lambda t, p: seen.append((t, p[0])), x, pair)
    assert seen[0][0] is x and seen[0][1] is pair[0]
    misaligned = torch.randn(6)[1:].view(1, 5)
    per_sample(lambda t, p: seen.append((t, p[0])), misaligned, pair)
    assert seen[1][0] is not misaligned and seen[1][0].data_ptr() % ALIGNMENT == 0
    assert torch.equal(seen[1][0], misaligned)


def test_gradients_flow_through_the_runs():
    x = torch.randn(3, 4, requires_grad=True)
    per_sample(lambda t: t.square(), x).sum().backward()
    torch.testing.assert_close(x.grad, 2 * x.detach())


def test_sample_wise_decorates_functions_and_methods():
    class Doubler(torch.nn.Module):
        @sample_wise
        def forward(self, t):
            self.calls += 1
            return t * 2

    module = Doubler()
    module.calls = 0
    x = torch.randn(4, 3)
    assert torch.equal(module(x), x * 2) and module.calls == 4
    assert torch.equal(module(x, runs=2), x * 2) and module.calls == 6
    assert sample_wise(scan).__name__ == "scan"


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="no tensor argument"):
        per_sample(lambda a, b: a, 3, ((), None))
    with pytest.raises(ValueError, match="runs must be a positive integer, got 0"):
        per_sample(lambda t: t, torch.zeros(2, 1), runs=0)
    with pytest.raises(TypeError, match="cannot join results of type int"):
        per_sample(lambda t: 1, torch.zeros(2, 1))
