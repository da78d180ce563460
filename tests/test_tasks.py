"""Classification tasks on tiny random BERT configs: splits disjoint by group, padding invariance,
and the whole `sea finetune` -> `sea distill --task` (both stages) -> `sea eval --task` pipeline."""

import json

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from conftest import minilm_tokenizer, save_tiny
from sea_attention.app.cli import main
from sea_attention.hf import patch
from sea_attention.tools.tasks import TaskColumns, check_task, encode, load_task
from sea_attention.tools.tasks.metrics import confusion_matrix, macro_f1

WORDS = {"good": ["great", "fine", "lovely", "superb"], "bad": ["awful", "dull", "poor", "weak"]}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A tiny random BERT classifier (MiniLM's tokenizer) and a CSV / JSONL task of 80 groups."""
    root = tmp_path_factory.mktemp("task")
    tokenizer = minilm_tokenizer()
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64,
                        vocab_size=tokenizer.vocab_size, max_position_embeddings=128, num_labels=2,
                        architectures=["BertForSequenceClassification"])
    save_tiny(BertForSequenceClassification(config), tokenizer, root / "bert")
    lines, records = ["review,verdict,film"], []
    for i in range(240):
        label = "good" if i % 2 else "bad"
        text = f"film {i % 80} was {WORDS[label][i % 4]} and " + " ".join(["quite"] * (i % 11))
        lines.append(f"{text},{label},f{i % 80}")
        records.append({"text": text, "label": label, "movie": f"f{i % 80}"})
    (root / "task.csv").write_text("\n".join(lines) + "\n")
    (root / "task.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return root


def test_splits_disjoint_by_group(task_dir):
    for name, columns in (("rt-polarity", TaskColumns()), ("bbc-topics", TaskColumns()),
                          (str(task_dir / "task.csv"), TaskColumns("review", "verdict", "film"))):
        splits = {s: load_task(name, s, columns) for s in ("train", "validation", "test")}
        groups = {s: set(d.groups) for s, d in splits.items()}
        assert not groups["train"] & groups["test"] and not groups["train"] & groups["validation"]
        assert not groups["validation"] & groups["test"]
        assert all(len(d.texts) for d in splits.values())
    rt = load_task("rt-polarity", "test")
    assert rt.label_names == ("negative", "positive") and set(rt.labels) == {0, 1}


def test_user_files_and_errors(task_dir):
    csv = load_task(str(task_dir / "task.csv"), "train", TaskColumns("review", "verdict", "film"))
    jsonl = load_task(str(task_dir / "task.jsonl"), "train", TaskColumns(group="movie"))
    assert csv.texts == jsonl.texts and csv.labels == jsonl.labels and csv.label_names == ("bad", "good")
    with pytest.raises(ValueError, match="no column 'text'"):
        load_task(str(task_dir / "task.csv"), "train")
    with pytest.raises(ValueError, match="unknown task"):
        check_task("sst2")


def test_metrics_by_hand():
    matrix = confusion_matrix([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], 3)
    assert matrix == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert macro_f1(matrix) == pytest.approx((0.5 + 0.8 + 0.0) / 3)


@pytest.mark.parametrize("sea", [False, True])
def test_padding_invariance(task_dir, sea):
    """A text alone and right-padded in a batch of longer texts gives the same logits (dense and SEA)."""
    model = BertForSequenceClassification.from_pretrained(task_dir / "bert").eval()
    tokenizer = AutoTokenizer.from_pretrained(task_dir / "bert")
    if sea:
        patch(model, k=4, estimate_width=16)
    texts = ["a short one", "a much longer text " + "with many words " * 12, "medium length text here " * 3]
    batch = encode(tokenizer, texts, [0, 1, 0], 128)
    assert batch.attention_mask[0].sum() < batch.attention_mask.shape[1]  # really padded
    with torch.no_grad():
        together = model(**batch.inputs()).logits
        for i, text in enumerate(texts):
            alone = model(**encode(tokenizer, [text], [0], 128).inputs()).logits
            torch.testing.assert_close(alone[0], together[i], atol=1e-5, rtol=1e-4)


def test_pipeline_end_to_end(task_dir, tmp_path, capsys):
    task = ["--task", str(task_dir / "task.jsonl"), "--group-column", "movie"]
    sea = ["--k", "4", "--estimate-width", "16"]
    small = ["--steps", "3", "--batch-size", "4", "--seq-len", "32", "--warmup-steps", "0", "--quiet"]
    assert main(["finetune", "--model", str(task_dir / "bert"), *task, "--batch-size", "16", "--max-len", "32",
                 "--out", str(tmp_path / "dense"), "--quiet"]) == 0
    assert main(["distill", "--model", str(tmp_path / "dense"), *task, *sea, *small, "--gate-form", "sigmoid",
                 "--out", str(tmp_path / "est")]) == 0
    assert json.loads((tmp_path / "est" / "sea_config.json").read_text())["sea_config"]["gate_form"] == "sigmoid"
    assert main(["distill", "--model", str(tmp_path / "est"), *task, *small, "--stage", "full",
                 "--out", str(tmp_path / "full")]) == 0
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tmp_path / "full"), *task, "--k", "2,4", "--seq-len", "32",
                 "--json", str(out), "--quiet"]) == 0
    result = json.loads(out.read_text())
    rows = {(r["method"], r["k"]): r for r in result["rows"]}
    assert set(rows) == {("dense", None), ("oracle", 2), ("sea", 2), ("oracle", 4), ("sea", 4)}
    assert result["label_names"] == ["bad", "good"] and result["split"] == "test"
    assert result["sea_config"]["gate_form"] == "sigmoid" and result["machine"]["cpu_model"]  # what the SEA rows ran
    for (method, k), row in rows.items():
        assert sum(map(sum, row["confusion"])) == result["examples"] == row["examples"]
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["macro_f1"] <= 1
    for k in (2, 4):  # the oracle's budget is exact; SEA's selection is measured, not assumed
        assert rows[("oracle", k)]["keys_per_query"] == pytest.approx(k)
    assert rows[("sea", 2)]["keys_per_query"] < rows[("dense", None)]["keys_per_query"]
    assert "accuracy" in capsys.readouterr().out




def test_plot_encoder_attention(task_dir, tmp_path):
    """`sea plot` on a BERT classifier draws its bidirectional maps: queries see keys after them."""
    from sea_attention.tools.viz import capture_attention

    out = tmp_path / "bert.png"
    assert main(["plot", "--model", str(task_dir / "bert"), "--task", str(task_dir / "task.csv"), "--text-column",
                 "review", "--label-column", "verdict", "--seq-len", "32", "--k", "4", "--estimate-width", "16",
                 "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    model = patch(BertForSequenceClassification.from_pretrained(task_dir / "bert"), k=4, estimate_width=16)
    snapshot = capture_attention(model, torch.arange(100, 120).unsqueeze(0), layer=1, head=2)
    assert not snapshot.causal and snapshot.teacher.triu(1).sum() > 0.1 * snapshot.teacher.sum()
    assert snapshot.sparse.triu(1).sum() > 0  # SEA's selection reaches keys after the query too


def test_datasets_id_task(tmp_path):
    """hf:ID goes through `datasets.load_dataset` (here a local folder, offline): class ids become class
    names, unlabelled rows (-1) are dropped, and every split is re-split by group."""
    from datasets import ClassLabel, Dataset, Features, Value

    features = Features({"sentence": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    for split, count in (("train", 120), ("test", 40)):
        labels = [-1 if split == "test" and i < 5 else i % 2 for i in range(count)]
        texts = [f"text {split} {i} " + ("nice" if i % 2 else "bad") for i in range(count)]
        Dataset.from_dict({"sentence": texts, "label": labels}, features=features).to_parquet(tmp_path / f"{split}.parquet")
    parts = [load_task(f"hf:{tmp_path}", s, TaskColumns(text="sentence")) for s in ("train", "validation", "test")]
    assert sum(len(p.texts) for p in parts) == 155 and parts[0].label_names == ("neg", "pos")
    assert all(("nice" in text) == bool(label) for p in parts for text, label in zip(p.texts, p.labels))


def test_finetune_resumes_only_the_same_run(task_dir, tmp_path):
    """A fine-tune resumes from its checkpoint (weights and losses come back); another data set is refused."""
    from sea_attention.tools.tasks.finetune import FinetuneConfig, finetune, load_classifier

    data = load_task(str(task_dir / "task.csv"), "train", TaskColumns("review", "verdict", "film")).subset(48)
    config = FinetuneConfig(batch_size=8, max_len=32, checkpoint_every=2)
    first, tokenizer = load_classifier(str(task_dir / "bert"), data)
    losses = finetune(first, tokenizer, data, config, tmp_path, progress=False)
    assert len(losses) == 6
    again, _ = load_classifier(str(task_dir / "bert"), data)
    assert finetune(again, tokenizer, data, config, tmp_path, progress=False) == losses  # resumed at the end
    torch.testing.assert_close(again.state_dict(), first.state_dict())
    with pytest.raises(ValueError, match="cannot resume"):
        finetune(again, tokenizer, data.subset(40), config, tmp_path, progress=False)


def test_cli_task_errors(task_dir, tiny_model_dir, tmp_path, capsys):
    """Clear refusals: --data with --task, a causal LM as a classifier, a task file that does not exist."""
    csv = ["--task", str(task_dir / "task.csv"), "--text-column", "review", "--label-column", "verdict"]
    assert main(["distill", "--model", str(task_dir / "bert"), *csv, "--data", "wiki", "--out", str(tmp_path / "x")]) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert main(["distill", "--model", str(tiny_model_dir / "model"), *csv, "--out", str(tmp_path / "y")]) == 2
    assert "not a classifier" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--model", "x", "--task", str(tmp_path / "missing.csv")])
    assert "unknown task" in capsys.readouterr().err
