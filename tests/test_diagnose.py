"""`sea diagnose` against a brute-force recomputation from dense masks and the KL formula."""

import json

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel, LlamaForCausalLM

from sea_attention.app.cli import main
from sea_attention.tools.diagnose import DiagnoseConfig, diagnose
from sea_attention.tools.distill import tokenize
from sea_attention.hf import LayerCall, layer_override, no_cache, patch, save_pretrained

SINKS = 4  # window_sinks' sinks


def tiny_llama(model_dir, **sea):
    return patch(LlamaForCausalLM.from_pretrained(model_dir / "model"), **sea)


def tiny_tokens(model_dir, count: int) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(model_dir / "model")
    return tokenize(tokenizer, (model_dir / "text.txt").read_text())[:count]


def dense_calls(model, ids: torch.Tensor) -> dict[int, LayerCall]:
    """Every layer's call on a dense forward (each layer passes the teacher's output on)."""
    calls = {}

    def keep(call: LayerCall):
        calls[call.layer_idx] = call
        return call.dense()[0], None

    with torch.no_grad(), layer_override(model, keep):
        model(input_ids=ids[None], **no_cache(model))
    return calls


def brute_force(call: LayerCall, k: int, skip: float) -> dict:
    """Per head: coverage of each method, one row at a time; the estimate's KL from its formula."""
    q, key = call.query[0].double(), call.key[0].double().repeat_interleave(call.query.shape[1] // call.key.shape[1], 0)
    heads, t = q.shape[0], q.shape[1]
    scores = (q @ key.transpose(-1, -2)) * call.scaling
    if call.causal:
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    probs = scores.softmax(-1)  # (H, T, T)
    with torch.no_grad():
        out = call.sea(call.query, call.key, call.value, attention_mask=call.key_valid, scale=call.scaling,
                       k_budget=k, return_attention=True)
    sea = out.attention[0] > 0
    estimate, width = out.estimate[0].double(), out.estimate.shape[-1]
    cover = {m: torch.zeros(heads, dtype=torch.float64) for m in ("sea", "oracle", "oracle_head", "window_sinks")}
    rows, kl = [i for i in range(t) if i >= skip * t], 0.0
    for i in rows:
        length = i + 1 if call.causal else t
        p = probs[:, i, :length]  # (H, L)
        cover["sea"] += (p * sea[:, i, :length]).sum(-1)
        flat = p.flatten()
        order = flat.argsort(descending=True)[: heads * min(k, length)]
        cover["oracle"] += torch.bincount(order // length, weights=flat[order], minlength=heads)
        cover["oracle_head"] += p.sort(-1, descending=True).values[:, :k].sum(-1)
        sinks = min(SINKS, k)
        window = list(range(length)) if length <= k else [*range(sinks), *range(length - (k - sinks), length)]
        cover["window_sinks"] += p[:, window].sum(-1)
        for h in range(heads):
            for b in range(width):
                target = float(p[h, b * length // width:(b + 1) * length // width].sum())
                if target > 0:
                    kl += target * (torch.tensor(target).log() - estimate[h, i, b].log()).item()
    head = {m: (c / len(rows)).tolist() for m, c in cover.items()}
    return {"head": head, "layer": {m: sum(c) / heads for m, c in head.items()}, "kl": kl / (len(rows) * heads),
            "sea_keys": float(sea.sum(-1).double().mean())}


def assert_matches(diagnosis, model, ids, k: int, skip: float, methods: tuple[str, ...]) -> None:
    assert diagnosis.methods == methods
    for layer, call in sorted(dense_calls(model, ids).items()):
        expected, measured = brute_force(call, k, skip), diagnosis.layers[layer]
        for method in methods:
            assert measured.coverage[method] == pytest.approx(expected["layer"][method], abs=1e-5), (layer, method)
            assert measured.head_coverage[method] == pytest.approx(expected["head"][method], abs=1e-5)
        assert measured.recall == pytest.approx(expected["layer"]["sea"] / expected["layer"]["oracle"], rel=1e-4)
        assert measured.estimate_kl == pytest.approx(expected["kl"], rel=1e-4, abs=1e-6)
        if skip == 0:  # keys per query are counted over every row
            assert measured.keys_per_query["sea"] == pytest.approx(expected["sea_keys"])


@pytest.mark.parametrize("grouping, skip, chunk", [("query", 0.0, 256), ("query", 0.5, 7), ("block", 0.25, 8)])
def test_diagnose_matches_brute_force(tiny_model_dir, grouping, skip, chunk):
    model = tiny_llama(tiny_model_dir, k=4, estimate_width=8, grouping=grouping, query_block=8)
    ids = tiny_tokens(tiny_model_dir, 32)
    config = DiagnoseConfig(k=4, seq_len=32, coverage_skip=skip, chunk_size=chunk)
    diagnosis = diagnose(model, ids, config, progress=False)
    assert (diagnosis.windows, diagnosis.tokens) == (1, 32)
    assert 0 < diagnosis.layers[0].coverage["sea"] < 1  # a real sparse selection, not all keys
    assert_matches(diagnosis, model, ids, 4, skip, ("sea", "oracle", "oracle_head", "window_sinks"))


def test_bidirectional_model_has_no_window_baseline():
    model = patch(BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=64, max_position_embeddings=64)), k=4, estimate_width=8)
    ids = torch.randint(0, 100, (24,))
    diagnosis = diagnose(model, ids, DiagnoseConfig(k=4, seq_len=24), progress=False)
    assert_matches(diagnosis, model, ids, 4, 0.0, ("sea", "oracle", "oracle_head"))


def test_dense_budget_covers_everything(tiny_model_dir):
    model = tiny_llama(tiny_model_dir, k=4, estimate_width=8)
    diagnosis = diagnose(model, tiny_tokens(tiny_model_dir, 64), DiagnoseConfig(k=32, seq_len=32), progress=False)
    assert diagnosis.windows == 2
    for layer in diagnosis.layers:
        assert layer.recall == pytest.approx(1.0, abs=1e-5)
        assert all(c == pytest.approx(1.0, abs=1e-5) for c in layer.coverage.values())
        assert layer.head_recall == pytest.approx([1.0] * 4, abs=1e-5)
        assert layer.estimate_kl > 0  # an untrained estimate is not the teacher's binned attention


def test_diagnose_refuses_what_it_cannot_measure(tiny_model_dir):
    with pytest.raises(ValueError, match="seq_len must be an integer >= 2"):
        DiagnoseConfig(seq_len=1)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        DiagnoseConfig(k=0)
    with pytest.raises(ValueError, match=r"coverage_skip must be a fraction in \[0, 1\)"):
        DiagnoseConfig(coverage_skip=1.0)
    with pytest.raises(ValueError, match="not SEA-patched"):
        diagnose(LlamaForCausalLM.from_pretrained(tiny_model_dir / "model"), torch.arange(8), DiagnoseConfig())
    with pytest.raises(ValueError, match="at least 2 tokens"):
        diagnose(tiny_llama(tiny_model_dir, k=4, estimate_width=8), torch.arange(1), DiagnoseConfig())


def test_cli_writes_table_json_and_plot(tiny_model_dir, tmp_path, capsys):
    saved = tmp_path / "sea"
    save_pretrained(tiny_llama(tiny_model_dir, k=4, estimate_width=8), saved,
                    base_model=str(tiny_model_dir / "model"))
    report, png = tmp_path / "out" / "diagnose.json", tmp_path / "out" / "diagnose.png"
    assert main(["diagnose", "--model", str(saved), "--data", str(tiny_model_dir / "text.txt"), "--seq-len", "32",
                 "--max-tokens", "96", "--k", "4", "--coverage-skip", "0.25", "--json", str(report),
                 "--plot", str(png), "--quiet"]) == 0
    printed = capsys.readouterr()
    assert "ignoring" not in printed.err  # --k is the budget measured, not a patch option
    header, *lines = printed.out.splitlines()
    assert header.split() == ["layer", "SEA", "keys", "SEA", "cov", "oracle", "cov", "oracle_head", "window", "cov",
                              "recall", "KL"]
    assert [line.split()[0] for line in lines[:3]] == ["0", "1", "mean"]
    payload = json.loads(report.read_text())
    assert (payload["windows"], payload["tokens"], payload["setup"]["coverage_skip"]) == (3, 96, 0.25)
    assert payload["model"] == str(saved) and payload["machine"]["cpu_model"]
    assert payload["sea_config"]["estimate_width"] == 8 and payload["sea_config"]["key_bounds"] is False
    assert [len(layer["head_coverage"]["sea"]) for layer in payload["layers"]] == [4, 4]
    recalls = [layer["recall"] for layer in payload["layers"]]
    assert payload["summary"]["recall"] == pytest.approx(sum(recalls) / 2)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in report.parent.iterdir()) == ["diagnose.json", "diagnose.png"]  # no debris


def test_bad_values_are_clear_errors(tiny_model_dir, capsys):
    model, text = str(tiny_model_dir / "model"), str(tiny_model_dir / "text.txt")
    assert main(["diagnose", "--model", "no-such-model", "--seq-len", "1", "--quiet"]) == 2  # before any loading
    assert "seq_len must be an integer >= 2, got 1" in capsys.readouterr().err
    assert main(["diagnose", "--model", model, "--data", "no-such-corpus.txt", "--quiet"]) == 2
    assert "expected one of" in capsys.readouterr().err
    assert main(["diagnose", "--model", model, "--data", text, "--max-tokens", "1", "--estimate-width", "8",
                 "--quiet"]) == 2
    assert "at least 2 tokens" in capsys.readouterr().err


def test_diagnose_task_probes_sea_against_the_dense_top_keys(tiny_model_dir, tmp_path, capsys):
    """`sea diagnose --task`: per answer step, layer and head, SEA's share of the dense top keys."""
    import json

    from sea_attention.app.cli import main

    report, png = tmp_path / "needle.json", tmp_path / "needle.png"
    assert main(["diagnose", "--model", str(tiny_model_dir / "model"), "--task", "needle", "--length", "128",
                 "--prompts", "2", "--prompt", "1", "--k", "8", "--haystack", str(tiny_model_dir / "text.txt"),
                 "--estimate-width", "8", "--json", str(report), "--plot", str(png), "--quiet"]) == 0
    payload = json.loads(report.read_text())
    steps, layers = payload["steps"], payload["layers"]
    assert steps == 8 and sorted(layers) == ["0", "1"]  # the dense answer's 8 tokens, both layers
    for layer in layers.values():
        assert len(layer["selected"]) == steps and len(layer["selected"][0]) == 4  # (steps, heads)
        assert all(0 <= x <= 1 for row in layer["selected_mass"] for x in row)
        assert all(0 <= r < 4 * 8 for row in layer["group_rank"] for r in row)
    # the dense answer is dense's greedy choice along itself; SEA's margins are finite, one per step
    assert len(payload["dense_margin"]) == len(payload["sea_margin"]) == steps
    assert all(m >= -1e-4 for m in payload["dense_margin"]) and all(abs(m) < 1e4 for m in payload["sea_margin"])
    printed = capsys.readouterr().out
    assert "dense" in printed and "margin dense +" in printed and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["diagnose", "--model", str(tiny_model_dir / "model"), "--task", "needle", "--prompts", "2",
                 "--prompt", "2", "--quiet"]) == 2
    assert "--prompt must be below --prompts (2)" in capsys.readouterr().err


def test_diagnose_task_reads_the_block_groupings_selection(tiny_model_dir, tmp_path):
    """With the block grouping the probe reads SEA's keys from its attention view and ranks the dense
    top-1 key in the estimate of the step's block's first row; a top-1 key in the step's own block (its
    tile, always attended) is selected and ranked -1; the budget is in bins for candidates x k keys."""
    import json

    from sea_attention.app.cli import main

    budgets, tiled = {}, 0
    for candidates in (1, 4):
        report = tmp_path / f"needle{candidates}.json"
        assert main(["diagnose", "--model", str(tiny_model_dir / "model"), "--task", "needle", "--length", "128",
                     "--prompts", "2", "--k", "8", "--haystack", str(tiny_model_dir / "text.txt"),
                     "--estimate-width", "8", "--grouping", "block", "--query-block", "16", "--candidates",
                     str(candidates), "--json", str(report), "--quiet"]) == 0
        payload = json.loads(report.read_text())
        assert (payload["sea_config"]["grouping"], payload["sea_config"]["candidates"]) == ("block", candidates)
        for layer in payload["layers"].values():
            for step in range(payload["steps"]):
                position = 128 - 1 + step  # the row predicting answer token ``step``
                for key, rank, hit in zip(layer["top1_key"][step], layer["group_rank"][step],
                                          layer["top1_selected"][step]):
                    if key >= position // 16 * 16:  # in the step's own block
                        tiled += 1
                        assert rank == -1 and hit == 1.0
                    else:
                        assert 0 <= rank < 4 * 8
        budgets[candidates] = [b for layer in payload["layers"].values() for row in layer["budget"] for b in row]
    assert tiled > 0  # the tiny model's top key is often a recent one
    assert all(b4 >= b1 for b1, b4 in zip(budgets[1], budgets[4])) and budgets[4] != budgets[1]


def test_margins_are_log_probability_gaps_to_the_best_other_token():
    """log p(token) - log p(best other): the greedy token's gap is positive, another token's negative."""
    import math

    from sea_attention.tools.retrieval_diagnose import margins

    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 3.0]])
    assert margins(logits, torch.tensor([0, 1])) == pytest.approx([1.0, 0.0])
    assert margins(logits, torch.tensor([2, 0])) == pytest.approx([-2.0, -3.0])
    assert all(math.isfinite(m) for m in margins(logits * 100, torch.tensor([2, 0])))


def test_the_task_probe_ranks_in_the_estimate_that_selected():
    """Block grouping: steps at positions 6 and 7 (blocks of 4) are ranked in row 4's estimate and bins,
    and a top-1 key of their own block (4, 5, 6, 7) gets rank -1; per query, in their own rows."""
    from types import SimpleNamespace

    from sea_attention import SEAConfig
    from sea_attention.core.grouping import grouping_for
    from sea_attention.tools.retrieval_diagnose import RetrievalDiagnoseConfig, TopKeyProbe

    estimate = torch.zeros(1, 1, 8, 4)
    estimate[0, 0, 4] = torch.tensor([0.1, 0.9, 0.0, 0.0])  # row 4 (5 keys): key 1 lies in bin 1, its best
    estimate[0, 0, 6:] = torch.tensor([0.0, 0.0, 0.9, 0.1])  # rows 6, 7: bin 1 third
    out = SimpleNamespace(lengths=torch.arange(1, 9)[None], estimated=torch.ones(1, 1, 8, 4, dtype=torch.bool),
                          estimate=estimate)
    top1 = torch.tensor([[[1, 5]]])  # (B, H, S): step 0 looks at key 1, step 1 at key 5
    probs = torch.zeros(1, 1, 2, 8).scatter_(-1, top1.unsqueeze(-1), 1.0)
    for grouping, expected in (("block", [0, -1]), ("query", [2, 0])):
        config = SEAConfig(num_heads=1, head_dim=8, k=2, estimate_width=4, grouping=grouping, query_block=4,
                           sinks=0, local_window=0)
        call = SimpleNamespace(query=torch.zeros(1, 1, 8, 8), key=torch.zeros(1, 1, 8, 8),
                               sea=SimpleNamespace(config=config))
        probe = TopKeyProbe(RetrievalDiagnoseConfig(k=2), steps=2)
        ranks = probe._estimate_ranks(call, out, grouping_for(config), probs, top1)
        assert ranks["head_rank"][0, 0].tolist() == expected, grouping
        if grouping == "block":  # the step's own block's keys get no mass in the oracle's bins
            assert ranks["mass_head_rank"][0, 0].tolist() == [0, -1]


def test_the_task_probe_offers_each_step_its_own_parts_budget():
    """With block_from between the answer steps, a step before it gets the per-query grouping's budget and a
    step after it the block grouping's (candidates x k), as each grouping alone would report."""
    from types import SimpleNamespace

    from sea_attention import SEAConfig
    from sea_attention.core.grouping import grouping_for
    from sea_attention.tools.retrieval_diagnose import RetrievalDiagnoseConfig, TopKeyProbe

    estimate = torch.rand(1, 1, 8, 4)
    out = SimpleNamespace(lengths=torch.arange(1, 9)[None], estimated=estimate, estimate=estimate)
    top1 = torch.tensor([[[1, 2, 3]]])  # (B, H, S): steps at positions 5, 6, 7
    probs = torch.zeros(1, 1, 3, 8).scatter_(-1, top1.unsqueeze(-1), 1.0)
    base = dict(num_heads=1, head_dim=8, k=1, estimate_width=4, query_block=2, sinks=0, local_window=0)

    def budgets(**options):
        config = SEAConfig(**base, **options)
        call = SimpleNamespace(query=torch.zeros(1, 1, 8, 8), key=torch.zeros(1, 1, 8, 8),
                               sea=SimpleNamespace(config=config))
        probe = TopKeyProbe(RetrievalDiagnoseConfig(k=1), steps=3)
        return probe._estimate_ranks(call, out, grouping_for(config).at(5, 8), probs, top1)["budget"][0, 0].tolist()

    mixed = budgets(block_from=6, block_candidates=3)
    assert mixed[0] == budgets()[0] and mixed[1:] == budgets(grouping="block", candidates=3)[1:]
    assert mixed[0] < mixed[2]  # three times the keys offered past block_from

