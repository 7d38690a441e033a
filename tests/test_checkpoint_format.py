"""One checkpoint folder format (issue 23): what ``PlasticTransformer.save_pretrained`` and
``ClArchForCausalLM.save_pretrained`` write, every loader reads (``PlasticTransformer.from_pretrained``,
``AutoConfig`` / ``AutoModelForCausalLM`` / ``AutoTokenizer`` / ``pipeline`` after ``import cl_arch.hf``),
folders written before it still load, the shipped model's logits are bitwise the same through every
path, the byte tokenizer round-trips text, ``cl_arch.load_default()`` and ``Session`` on the wrapper.

Tiny models (``d_model=32, n_layers=2``) except for the shipped-model checks; nothing is downloaded."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import cl_arch
from cl_arch import PlasticConfig, PlasticTransformer, Session, default_model_dir, load_default

HAS_HF = importlib.util.find_spec("transformers") is not None
needs_hf = pytest.mark.skipif(not HAS_HF, reason="needs the hf extra (transformers)")

# The shipped model's fingerprint: saved sessions are tied to it, so no change of the folder's
# format may move it (the weights file was left byte for byte as it was when config.json gained
# model_type / architectures and tokenizer_config.json was added).
# fcaaa96fc0d8094e until the verdict memory was added (issue 25), b3bc49a57787ce65 until the model trained through
# adaptation with episodic error writes was shipped (issue 24; scripts/make_default_model.sh, step 4)
SHIPPED_FINGERPRINT = "661ce72ea68e89f1"
PROMPT = "import os\ndef main():  # héllo, wörld ✓\n    return"


def tiny(seed: int = 0, **kw) -> PlasticTransformer:
    torch.manual_seed(seed)
    return PlasticTransformer(PlasticConfig(d_model=32, n_layers=2, **kw)).eval()


def ids_of(text: str = PROMPT) -> torch.Tensor:
    return torch.tensor([list(text.encode("utf-8"))])


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out[0]


def as_old_core_folder(src, dst) -> str:
    """``src`` as PlasticTransformer.save_pretrained wrote it before this format (the shipped model's
    files until then): config.json without model_type / architectures, no tokenizer_config.json."""
    os.makedirs(dst)
    shutil.copy(os.path.join(src, "model.safetensors"), dst)
    meta = json.load(open(os.path.join(src, "config.json")))
    old = {k: meta[k] for k in ("config", "fingerprint", "cl_arch_version", "fast_memory_format")}
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(old, f, indent=2, sort_keys=True)
    return str(dst)


def as_old_hf_folder(model: PlasticTransformer, dst) -> str:
    """What ``ClArchForCausalLM.from_plastic(model).save_pretrained(dst)`` wrote before this format:
    tensors ``model.<name>``, the config under ``"plastic"``, no fingerprint, format or tokenizer file."""
    from safetensors.torch import save_file

    os.makedirs(dst)
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model._export_tensors().items()}
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    meta = {"architectures": ["ClArchForCausalLM"], "dtype": "float32", "model_type": "cl_arch",
            "plastic": model.config.to_dict(), "tie_word_embeddings": model.config.tie_embeddings,
            "transformers_version": "5.24.0", "use_cache": True, "vocab_size": model.config.vocab_size}
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    return str(dst)


# ----------------------------------------------------------------------------- the core, no transformers
def test_core_writes_the_folder_without_transformers(tmp_path):
    code = ("import json, os, sys, torch, cl_arch\n"
            "m = cl_arch.PlasticTransformer(cl_arch.PlasticConfig(d_model=32, n_layers=2))\n"
            f"d = {str(tmp_path)!r}\n"
            "m.save_pretrained(d)\n"
            "assert cl_arch.PlasticTransformer.from_pretrained(d).fingerprint() == m.fingerprint()\n"
            "print(sorted(os.listdir(d)), 'transformers' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['config.json', 'model.safetensors', 'tokenizer_config.json'] False"
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["model_type"] == "cl_arch" and meta["architectures"] == ["ClArchForCausalLM"]
    assert meta["fast_memory_format"] == 2 and len(meta["fingerprint"]) == 16
    assert PlasticConfig.from_dict(meta["config"]) == PlasticConfig(d_model=32, n_layers=2)
    tok = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert tok["tokenizer_class"] == "ClArchByteTokenizer" and tok["vocab_size"] == 256


def test_load_default_is_the_shipped_model():
    m = load_default()
    assert isinstance(m, PlasticTransformer) and not m.training
    assert m.fingerprint() == SHIPPED_FINGERPRINT
    assert default_model_dir() == os.path.join(os.path.dirname(cl_arch.__file__), "assets", "default_model")
    from cl_arch.eval.lib.models import default_model

    said = []
    assert default_model(log=said.append).fingerprint() == SHIPPED_FINGERPRINT
    assert "bits/byte" in said[0]


def test_old_core_folder_still_loads(tmp_path):
    m = tiny()
    m.save_pretrained(tmp_path / "new")
    old = as_old_core_folder(tmp_path / "new", tmp_path / "old")
    loaded = PlasticTransformer.from_pretrained(old).eval()
    assert loaded.fingerprint() == m.fingerprint()
    assert torch.equal(logits(loaded, ids_of()), logits(m, ids_of()))


def test_a_folder_of_neither_format_names_what_is_missing(tmp_path):
    m = tiny()
    m.save_pretrained(tmp_path)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"hidden_size": 32, "num_hidden_layers": 2}))
    with pytest.raises(ValueError, match="no 'config' key .* and no model_type 'cl_arch' with a 'plastic' key"):
        PlasticTransformer.from_pretrained(tmp_path)
    cfg.write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    with pytest.raises(ValueError, match="model_type 'llama', expected 'cl_arch'"):
        PlasticTransformer.from_pretrained(tmp_path)
    cfg.write_text(json.dumps({"model_type": "cl_arch", "config": [1, 2]}))
    with pytest.raises(ValueError, match="corrupt checkpoint config .* not a JSON object"):
        PlasticTransformer.from_pretrained(tmp_path)
    cfg.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="corrupt checkpoint config"):
        PlasticTransformer.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------- transformers
@needs_hf
def test_every_loader_reads_what_either_writer_writes(tmp_path):
    import transformers

    from cl_arch.hf import ClArchByteTokenizer, ClArchConfig, ClArchForCausalLM

    m = tiny(1)
    ids = ids_of()
    want = logits(m, ids)
    core = str(tmp_path / "core")
    m.save_pretrained(core)
    assert isinstance(transformers.AutoConfig.from_pretrained(core, local_files_only=True), ClArchConfig)
    hm = transformers.AutoModelForCausalLM.from_pretrained(core, local_files_only=True).eval()
    assert isinstance(hm, ClArchForCausalLM) and torch.equal(logits(hm, ids), want)
    assert isinstance(transformers.AutoTokenizer.from_pretrained(core, local_files_only=True), ClArchByteTokenizer)

    wrapped = str(tmp_path / "wrapped")
    hm.save_pretrained(wrapped)
    meta = json.load(open(os.path.join(wrapped, "config.json")))
    assert "plastic" not in meta and PlasticConfig.from_dict(meta["config"]) == m.config
    assert meta["fingerprint"] == m.fingerprint() and meta["fast_memory_format"] == 2
    assert meta["model_type"] == "cl_arch"
    for folder in (core, wrapped):
        back = PlasticTransformer.from_pretrained(folder).eval()
        assert back.fingerprint() == m.fingerprint() and torch.equal(logits(back, ids), want)
        again = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
        assert torch.equal(logits(again, ids), want)
        tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        assert tok.decode(tok(PROMPT)["input_ids"]) == PROMPT

    # The wrapper checks the recorded fingerprint as PlasticTransformer does.
    other = tiny(2)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in other._export_tensors().items()}, os.path.join(core, "model.safetensors"))
    with pytest.raises(ValueError, match="fingerprint"):
        transformers.AutoModelForCausalLM.from_pretrained(core, local_files_only=True)


@needs_hf
def test_folders_written_before_this_format_still_load(tmp_path):
    import transformers

    from cl_arch.hf import ClArchForCausalLM

    m = tiny(3)
    ids = ids_of()
    want = logits(m, ids)
    m.save_pretrained(tmp_path / "new")
    old_core = as_old_core_folder(tmp_path / "new", tmp_path / "old_core")
    # No model_type: AutoConfig cannot pick the class, the class itself reads it.
    hm = ClArchForCausalLM.from_pretrained(old_core, local_files_only=True).eval()
    assert torch.equal(logits(hm, ids), want)

    old_hf = as_old_hf_folder(m, tmp_path / "old_hf")
    back = PlasticTransformer.from_pretrained(old_hf).eval()
    assert back.fingerprint() == m.fingerprint() and torch.equal(logits(back, ids), want)
    assert torch.equal(logits(transformers.AutoModelForCausalLM.from_pretrained(old_hf, local_files_only=True), ids),
                       want)
    assert len(transformers.AutoTokenizer.from_pretrained(old_hf, local_files_only=True)) == 256

    # Format 1 (before the resting state) is refused through transformers as well.
    cfg = os.path.join(tmp_path / "new", "config.json")
    meta = json.load(open(cfg))
    meta["fast_memory_format"] = 1
    json.dump(meta, open(cfg, "w"))
    with pytest.raises(ValueError, match="decayed toward zero"):
        transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "new"), local_files_only=True)


@needs_hf
def test_shipped_model_logits_are_bitwise_the_same_through_every_path(tmp_path):
    import transformers

    from cl_arch.hf import ClArchByteTokenizer, ClArchForCausalLM

    folder = default_model_dir()
    meta = json.load(open(os.path.join(folder, "config.json")))
    assert meta["model_type"] == "cl_arch" and meta["fingerprint"] == SHIPPED_FINGERPRINT
    ids = ids_of()
    ref = load_default()
    assert ref.fingerprint() == SHIPPED_FINGERPRINT
    want = logits(ref, ids)
    hm = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    hm.save_pretrained(tmp_path / "resaved")
    old = as_old_core_folder(folder, tmp_path / "old")  # the folder's files before it gained model_type
    paths = {
        "PlasticTransformer.from_pretrained": PlasticTransformer.from_pretrained(folder),
        "AutoModelForCausalLM": hm,
        "ClArchForCausalLM": ClArchForCausalLM.from_pretrained(folder, local_files_only=True),
        "old layout, PlasticTransformer": PlasticTransformer.from_pretrained(old),
        "old layout, ClArchForCausalLM": ClArchForCausalLM.from_pretrained(old, local_files_only=True),
        "saved by the wrapper": PlasticTransformer.from_pretrained(tmp_path / "resaved"),
    }
    for name, model in paths.items():
        assert torch.equal(logits(model.eval(), ids), want), name
    tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert isinstance(tok, ClArchByteTokenizer) and tok(PROMPT)["input_ids"] == list(PROMPT.encode())


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to open a connection refused (and recorded): loading a local folder is offline."""
    import socket

    attempts = []

    def refuse(self, address, *a, **k):
        attempts.append(address)
        raise OSError(f"test: no network ({address})")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


@needs_hf
def test_pipeline_generates_what_a_session_does(tmp_path, no_network):
    import transformers

    folder = default_model_dir()
    pipe = transformers.pipeline("text-generation", model=folder)
    prompt = "import os\ndef main("
    out = pipe(prompt, max_new_tokens=16, do_sample=False)[0]["generated_text"]
    want = Session(load_default()).generate(list(prompt.encode()), max_new_tokens=16, temperature=0)
    assert out == prompt + bytes(want).decode("utf-8", errors="replace")
    tiny(4).save_pretrained(tmp_path)
    pipe = transformers.pipeline("text-generation", model=str(tmp_path))
    assert pipe("héllo", max_new_tokens=4, do_sample=False)[0]["generated_text"].startswith("héllo")
    assert no_network == []


@needs_hf
def test_byte_tokenizer_round_trip():
    from cl_arch.hf import ClArchByteTokenizer

    tok = ClArchByteTokenizer()
    texts = ["", "hello world", " a  . , ! ?", "héllo wörld", "日本語のテキスト", "emoji 🙂🚀", "tab\tnul\x00\n",
             "<|extra_256|> is text here", "<s></s><pad>"]
    for text in texts:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8")), text
        assert tok.decode(ids) == text
        assert tok(text)["input_ids"] == ids
    assert len(tok) == 256 and tok.vocab_size == 256
    assert tok.bos_token_id is None and tok.eos_token_id is None and tok.pad_token_id is None
    # Invalid UTF-8 (a generation cut inside a character, a stray byte): replacement, not an exception.
    assert tok.decode([0xE2, 0x82]) == "\ufffd"
    assert tok.decode(list(b"a") + [0xFF] + list(b"b")) == "a\ufffdb"
    assert tok.decode(torch.tensor(list("é".encode()))) == "é"
    with pytest.raises(ValueError, match="id 300"):
        tok.decode([300])


@needs_hf
def test_byte_tokenizer_for_other_vocabularies(tmp_path):
    import transformers

    from cl_arch.hf import ClArchByteTokenizer

    big = tiny(5, vocab_size=260)
    big.save_pretrained(tmp_path / "big")
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "big"), local_files_only=True)
    assert len(tok) == 260 and tok.vocab_size == 256
    assert tok.encode("a<|extra_258|>b") == [97, 258, 98]
    assert tok.decode([97, 258, 98]) == "a<|extra_258|>b"
    assert tok.decode([97, 258, 98], skip_special_tokens=True) == "ab"
    tok.save_pretrained(tmp_path / "tok")
    again = ClArchByteTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert len(again) == 260 and again.decode([259]) == "<|extra_259|>"
    small = ClArchByteTokenizer(vocab_size=128)
    assert small.encode("ascii") == list(b"ascii")
    with pytest.raises(ValueError, match="byte 0xc3 is outside this model's vocabulary of 128"):
        small.encode("é")
    with pytest.raises(ValueError, match="vocab_size"):
        ClArchByteTokenizer(vocab_size=0)


@needs_hf
def test_session_takes_the_transformers_wrapper(tmp_path):
    import transformers

    tiny(6).save_pretrained(tmp_path)
    hm = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), local_files_only=True)
    pm = PlasticTransformer.from_pretrained(tmp_path)
    a, b = Session(hm, seed=7), Session(pm, seed=7)
    assert a.model is hm.model
    prompt = list(b"def f(x):")
    assert a.generate(prompt, max_new_tokens=12) == b.generate(prompt, max_new_tokens=12)
    assert a.reward(1.0) == b.reward(1.0)
    assert all(torch.equal(p, q) for p, q in zip(a.P, b.P))
    assert a.generate(prompt, max_new_tokens=12) == b.generate(prompt, max_new_tokens=12)

    class NotAModel:
        plastic_model = "nothing"

    with pytest.raises(ValueError, match="must be a PlasticModel"):
        Session(NotAModel())


@needs_hf
def test_a_folder_from_elsewhere_runs_no_code(tmp_path):
    """``auto_map`` entries naming code in the folder are ignored: the registered classes load it."""
    import transformers

    from cl_arch.hf import ClArchByteTokenizer, ClArchForCausalLM

    folder = str(tmp_path)
    tiny(7).save_pretrained(folder)
    marker = tmp_path / "ran"
    (tmp_path / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('x')\n"
        "from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizer\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'cl_arch'\n"
        "class EvilModel(PreTrainedModel):\n    config_class = EvilConfig\n"
        "class EvilTokenizer(PreTrainedTokenizer):\n    pass\n")
    for name, key, value in (("config.json", "auto_map", {"AutoConfig": "evil.EvilConfig",
                                                          "AutoModelForCausalLM": "evil.EvilModel"}),
                             ("tokenizer_config.json", "auto_map", {"AutoTokenizer": ["evil.EvilTokenizer", None]})):
        meta = json.load(open(os.path.join(folder, name)))
        meta[key] = value
        json.dump(meta, open(os.path.join(folder, name), "w"))
    assert isinstance(transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True),
                      ClArchForCausalLM)
    assert isinstance(transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True), ClArchByteTokenizer)
    PlasticTransformer.from_pretrained(folder)
    assert not marker.exists()
