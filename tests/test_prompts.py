"""The a1111 prompt syntax: `ldm.prompts.parse` against AUTOMATIC1111's documented rules, and the weighted,
chunked encoding against a re-computation from those rules on tiny text towers.

Expected parses are written from the rules of A1111's `parse_prompt_attention` (modules/prompt_parser.py,
AUTOMATIC1111/stable-diffusion-webui): its docstring lists the accepted tokens ("(abc) - increases attention
to abc by a multiplier of 1.1", "(abc:3.12) - ... by a multiplier of 3.12", "[abc] - decreases attention to
abc by a multiplier of 1.1", "\\( \\[ \\) \\] \\\\ - literal characters", "anything else - just text") and
examples (the ones marked DOC below are its doctests, verbatim); the weight token is `:` + optional spaces +
an optional sign and digits/dots + optional spaces + `)`; brackets left open close at the end of the text;
`BREAK` (a whole word, spaces around it dropped) is ["BREAK", -1]; neighbours of equal weight are merged;
a closer with nothing open, and a colon that is not a weight, are text; a lone backslash is dropped.
Weights are products taken innermost bracket first, written below as such products (R = 1.1, S = 1/1.1).
"""
from types import SimpleNamespace

import pytest
import torch

from ldm.prompts import chunks, encode, parse
from models.clip_text import CLIPTextConfig, CLIPTextModel
from models.openclip_text import OpenCLIPTextConfig, OpenCLIPTextModel
from models.tokenizer import END, START, Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
R, S = 1.1, 1 / 1.1

PARSES = [
    # DOC: the docstring's examples
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    # brackets and weights
    ("", [("", 1.0)]),
    ("(a)", [("a", R)]),
    ("[a]", [("a", S)]),
    ("((a))", [("a", 1.0 * R * R)]),
    ("[[a]]", [("a", 1.0 * S * S)]),
    ("(a:1.5)", [("a", 1.5)]),
    ("((a:1.3))", [("a", 1.3 * R)]),
    ("(a:.5)", [("a", 0.5)]),
    ("(a:2.)", [("a", 2.0)]),
    ("(a:0)", [("a", 0.0)]),
    ("(a:1e2)", [("a:1e2", R)]),                          # no exponent in a weight: text, closed by ")"
    ("(a:1.5:2)", [("a:1.5", 2.0)]),                      # only the last ":2)" is the weight
    ("(a::1.5)", [("a:", 1.5)]),
    ("(a:x)", [("a:x", R)]),
    ("a:b", [("a:b", 1.0)]),
    # weights with spaces and signs
    ("(a: 1.5 )", [("a", 1.5)]),
    ("(a:+1.5)", [("a", 1.5)]),
    ("(a:-1)", [("a", -1.0)]),
    ("(a:-.5)", [("a", -0.5)]),
    ("(a:- 1)", [("a:- 1", R)]),                          # no space between sign and number
    ("a (b:1.5) c (d:1.5)", [("a ", 1.0), ("b", 1.5), (" c ", 1.0), ("d", 1.5)]),
    ("a  (  b  )  c", [("a  ", 1.0), ("  b  ", R), ("  c", 1.0)]),
    # nesting multiplies, innermost first
    ("(a (b) c)", [("a ", R), ("b", 1.0 * R * R), (" c", R)]),
    ("((a:2) b)", [("a", 2.0 * R), (" b", R)]),
    ("[(a:2)]", [("a", 2.0 * S)]),
    ("([a])", [("a", 1.0 * S * R)]),
    ("[(a)]", [("a", 1.0 * R * S)]),
    ("[a (b] c)", [("a ", S), ("b", 1.0 * S * R), (" c", R)]),  # each closer closes its own kind
    # merging of equal neighbours
    ("(a:1.5)(b:1.5)", [("ab", 1.5)]),
    ("(a)[b]", [("a", R), ("b", S)]),
    ("(a:1.1)(b)", [("ab", 1.1)]),
    # unbalanced
    ("((a)", [("a", 1.0 * R * R)]),
    ("a (b", [("a ", 1.0), ("b", R)]),
    ("a)", [("a)", 1.0)]),
    ("a]", [("a]", 1.0)]),
    ("(a]", [("a]", R)]),
    ("[a)", [("a)", S)]),
    ("(a:1.5", [("a:1.5", R)]),
    ("a:1.5)", [("a:1.5)", 1.0)]),
    ("[[a]", [("a", 1.0 * S * S)]),
    # escapes
    ("\\\\", [("\\", 1.0)]),
    ("a\\b", [("ab", 1.0)]),
    ("\\(a\\)", [("(a)", 1.0)]),
    ("(\\(a\\))", [("(a)", R)]),
    ("\\[a\\]", [("[a]", 1.0)]),
    ("\\((a)", [("(", 1.0), ("a", R)]),
    # BREAK
    ("a BREAK b", [("a", 1.0), ("BREAK", -1), ("b", 1.0)]),
    ("BREAK", [("", 1.0), ("BREAK", -1), ("", 1.0)]),
    ("aBREAK b", [("aBREAK b", 1.0)]),
    ("a BREAKb", [("a BREAKb", 1.0)]),
    ("a break b", [("a break b", 1.0)]),
    ("a,BREAK,b", [("a,", 1.0), ("BREAK", -1), (",b", 1.0)]),
    ("a BREAK BREAK b", [("a", 1.0), ("BREAK", -1), ("", 1.0), ("BREAK", -1), ("b", 1.0)]),
    ("a\nBREAK\nb", [("a", 1.0), ("BREAK", -1), ("b", 1.0)]),
    ("(a BREAK b)", [("a", R), ("BREAK", -1 * R), ("b", R)]),   # inside brackets it is weighted like text
    ("(a:1.5)BREAK", [("a", 1.5), ("", 1.0), ("BREAK", -1), ("", 1.0)]),
    # editing and alternation are not this function's: their brackets weigh as brackets
    ("[a:b:0.5]", [("a:b:0.5", S)]),
    ("[a|b]", [("a|b", S)]),
    # unicode
    ("café (naïve:1.2) 日本", [("café ", 1.0), ("naïve", 1.2), (" 日本", 1.0)]),
    ("(日本語)", [("日本語", R)]),
    ("🙂 [🙃]", [("🙂 ", 1.0), ("🙃", S)]),
]


def test_enough_prompts_are_checked():
    assert len(PARSES) >= 60 and len({p for p, _ in PARSES}) == len(PARSES)


@pytest.mark.parametrize("text,expected", PARSES, ids=range(len(PARSES)))
def test_parse_follows_a1111s_rules(text, expected):
    assert parse(text) == expected


def test_a_weight_that_is_no_number_is_refused():
    with pytest.raises(ValueError, match="1.2.3"):
        parse("(a:1.2.3)")


# ---- chunks of 75 tokens, weights, mean restoration: encode() against a re-computation from the rules --------
A, COMMA = 320, 267  # "a" and "," are one token each in CLIP's BPE vocabulary


def _tower(kind: str):
    """A tiny text tower with random weights, as a model: tokenizer (its family's pad), encoder, placement."""
    torch.manual_seed(0)
    if kind == "clip":
        net, pad = CLIPTextModel(CLIPTextConfig(width=32, layers=2, heads=2, intermediate_size=64)), END
    else:
        net, pad = OpenCLIPTextModel(OpenCLIPTextConfig(width=32, layers=2, heads=2, embed_dim=32)), 0
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.3)
    return SimpleNamespace(tokenizer=Tokenizer(pad), text_encoder=net.eval(),
                           placement=SimpleNamespace(device=torch.device("cpu"))), pad


def _rows(chunk_ids: list[int], chunk_weights: list[float], pad: int) -> tuple[list[int], list[float]]:
    """One chunk as the rules build it: <start>, its tokens, <end>, then the encoder's padding to 77."""
    ids = [START] + chunk_ids + [END] + [pad] * (75 - len(chunk_ids))
    return ids, [1.0] + chunk_weights + [1.0] * (76 - len(chunk_weights))


def _expected(model, pad, texts_chunks):
    """texts_chunks: per text, its chunks as (ids, weights) lists; shorter texts take the empty chunk."""
    out = []
    for c in range(max(len(t) for t in texts_chunks)):
        batch = [_rows(*t[c], pad) if c < len(t) else _rows([], [], pad) for t in texts_chunks]
        z = model.text_encoder(torch.tensor([ids for ids, _ in batch]))
        w = torch.tensor([ws for _, ws in batch])
        weighted = z * w[..., None]
        out.append(weighted * (z.mean() / weighted.mean()))
    return torch.cat(out, dim=1)


def _a(n: int) -> str:
    return "a " * n


# (prompt, its chunks as (ids, weights)), each written out from the rules
CASES = {
    1: ("a", [([A], [1.0])]),
    75: (_a(75), [([A] * 75, [1.0] * 75)]),
    76: (_a(76), [([A] * 75, [1.0] * 75), ([A], [1.0])]),
    # the 76th token meets a full chunk whose last comma is 15 back (<= 20): the chunk ends at the comma, and
    # the 14 tokens after it start the next; the weighted run (1.5) crosses the cut
    150: (_a(40) + "(" + _a(20) + ":1.5) , " + _a(89),
          [([A] * 60 + [COMMA], [1.0] * 40 + [1.5] * 20 + [1.0]), ([A] * 75, [1.0] * 75), ([A] * 14, [1.0] * 14)]),
    # a comma 25 back (> 20) is not looked back to; BREAK ends a chunk early; [a] weighs 1/1.1
    300: (_a(50) + ", " + _a(49) + "BREAK " + _a(100) + "[" + _a(10) + "]" + _a(90),
          [([A] * 50 + [COMMA] + [A] * 24, [1.0] * 75), ([A] * 25, [1.0] * 25), ([A] * 75, [1.0] * 75),
           ([A] * 25 + [A] * 10 + [A] * 40, [1.0] * 25 + [S] * 10 + [1.0] * 40), ([A] * 50, [1.0] * 50)]),
}


def test_the_cases_have_the_token_counts_they_are_named_for():
    tokenizer = Tokenizer(END)
    assert tokenizer.encode("a") == [A] and tokenizer.encode(",") == [COMMA]
    for n, (_, expected) in CASES.items():
        assert sum(len(ids) for ids, _ in expected) == n


@pytest.mark.parametrize("kind", ["clip", "openclip"])
@pytest.mark.parametrize("n", sorted(CASES))
def test_weighted_chunked_encoding_matches_the_rules(kind, n):
    model, pad = _tower(kind)
    prompt, expected_chunks = CASES[n]
    assert chunks(parse(prompt), model.tokenizer.encode, COMMA) == [
        _rows(ids, ws, END) for ids, ws in expected_chunks]  # padded with <end>, before the encoder's pad
    with torch.no_grad():
        got = encode(model, [prompt])
        expected = _expected(model, pad, [expected_chunks])
    assert got.shape == (1, 77 * len(expected_chunks), 32)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["clip", "openclip"])
def test_a_batch_restores_its_mean_over_all_texts_and_pads_short_ones_with_the_empty_chunk(kind):
    model, pad = _tower(kind)
    short, long = "(a:1.3) a", _a(76)
    with torch.no_grad():
        got = encode(model, [short, long])
        expected = _expected(model, pad, [[([A, A], [1.3, 1.0])], CASES[76][1]])
        alone = encode(model, [short])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(got[0, :77], alone[0])  # the mean restored is the batch's, as A1111's
    if kind == "openclip":  # the empty chunk as OpenCLIP pads it: <start>, <end>, then zeros
        assert _rows([], [], pad)[0][:3] == [START, END, 0]


def test_comma_exactly_20_back_still_cuts():
    model, _ = _tower("clip")
    got = chunks(parse(_a(55) + ", " + _a(30)), model.tokenizer.encode, COMMA)
    assert [len([t for t in ids if t in (A, COMMA)]) for ids, _ in got] == [56, 30]


# ---- the commands: --prompt-syntax and A1111 lines in --from-file ----------------------------------------
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import ldm  # noqa: E402
from conftest import FIXTURES, REFERENCE  # noqa: E402
from ldm import generate, pipeline, special_run  # noqa: E402
from ldm.images import read_parameters, read_settings, to_uint8  # noqa: E402

WEIGHTED = "a (red:1.4) circle, [blue] square BREAK top left " + "a " * 70


def _flags(out, name="sd1_tiny"):
    return ["--ckpt", FIXTURES[name] / f"{name}.safetensors", "--config", FIXTURES[name] / f"{name}.yaml",
            "--device", "cpu", "--precision", "full", "--H", 32, "--W", 32, "--ddim_steps", 2, "--n_iter", 1,
            "--outdir", out]


def _run(capsys, command, argv, main=generate.main):
    capsys.readouterr()
    code = main(command, [str(a) for a in argv])
    return (code, *capsys.readouterr())


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_the_prompt_syntax_flag_is_the_pipelines(tmp_path, capsys):
    base = _flags(tmp_path / "a") + ["--prompt", WEIGHTED, "--n_samples", 1, "--seed", 4, "--skip_grid"]
    code, _, err = _run(capsys, "txt2img", base + ["--prompt-syntax", "a1111"])
    assert code == 0, err
    code, _, err = _run(capsys, "txt2img", base + ["--outdir", tmp_path / "o"])
    assert code == 0, err
    a1111, original = _pixels(tmp_path / "a" / "samples" / "00000.png"), _pixels(tmp_path / "o" / "samples" / "00000.png")
    model = ldm.load(FIXTURES["sd1_tiny"] / "sd1_tiny.safetensors", config=FIXTURES["sd1_tiny"] / "sd1_tiny.yaml",
                     device="cpu")
    kw = dict(seed=4, height=32, width=32, steps=2, sampler="ddim")
    np.testing.assert_array_equal(a1111, to_uint8(pipeline.txt2img(model, WEIGHTED, prompt_syntax="a1111", **kw)[0])[0])
    np.testing.assert_array_equal(original, to_uint8(pipeline.txt2img(model, WEIGHTED, **kw)[0])[0])
    assert not np.array_equal(a1111, original)
    assert read_settings(tmp_path / "a" / "samples" / "00000.png")["prompt_syntax"] == "a1111"
    assert read_settings(tmp_path / "o" / "samples" / "00000.png")["prompt_syntax"] == "original"


def test_a_special_command_takes_the_prompt_syntax(tmp_path, capsys):
    name = "sd2_depth_tiny"
    special = REFERENCE / "special" / name
    argv = ["--ckpt", special / f"{name}.safetensors", "--config", special / f"{name}.yaml", "--device", "cpu",
            "--init-img", REFERENCE / "special" / "inputs" / "init.png",
            "--depth-map", REFERENCE / "special" / "inputs" / "depth.png", "--ddim_steps", 4, "--strength", 0.5,
            "--prompt", "a [red:blue:0.5] (room:1.3)", "--skip_grid"]
    for syntax in ("a1111", "original"):
        code, _, err = _run(capsys, "depth2img", argv + ["--prompt-syntax", syntax, "--outdir", tmp_path / syntax],
                            special_run.main)
        assert code == 0, err
    assert not np.array_equal(_pixels(tmp_path / "a1111" / "samples" / "00000.png"),
                              _pixels(tmp_path / "original" / "samples" / "00000.png"))


def test_from_file_takes_plain_and_a1111_lines(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n"
                       "--prompt \"a blue\" square --negative_prompt 'green, (bright:1.2)' --seed 9\n"
                       "a yellow circle\n")
    code, _, err = _run(capsys, "txt2img", _flags(tmp_path / "f") + ["--from-file", prompts, "--n_samples", 2,
                                                                      "--seed", 5, "--prompt-syntax", "a1111"])
    assert code == 0, err
    samples = sorted((tmp_path / "f" / "samples").iterdir())
    # plain lines batched by n_samples as the original (each its own batch here: the A1111 line is between)
    assert [read_settings(p)["prompt"] for p in samples] == ["a red circle", "a blue square", "a blue square",
                                                             "a yellow circle"]
    s = read_settings(samples[1])
    assert (s["negative_prompt"], s["seed"]) == ("green, (bright:1.2)", 9)
    assert read_parameters(samples[1]).splitlines()[1] == "Negative prompt: green, (bright:1.2)"
    assert (read_settings(samples[0])["seed"], read_settings(samples[0])["negative_prompt"]) == (5, "")
    # the line's batch is the command run with the line's prompt, negative prompt and seed
    code, _, err = _run(capsys, "txt2img", _flags(tmp_path / "one") + [
        "--prompt", "a blue square", "--negative-prompt", "green, (bright:1.2)", "--seed", 9, "--n_samples", 2,
        "--prompt-syntax", "a1111", "--skip_grid"])
    assert code == 0, err
    for i in range(2):
        np.testing.assert_array_equal(_pixels(samples[1 + i]),
                                      _pixels(tmp_path / "one" / "samples" / f"0000{i}.png"))


@pytest.mark.parametrize("line,message", [
    ("--prompt a --steps 20", "--steps is not taken here"),
    ("--prompt a --seed x", "--seed x: must be a whole number"),
    ("--negative_prompt a", "has no --prompt"),
    ("--prompt \"a", "quote"),
])
def test_a_bad_a1111_line_is_one_line(tmp_path, capsys, line, message):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a cat\n{line}\n")
    code, _, err = _run(capsys, "txt2img", _flags(tmp_path) + ["--from-file", prompts])
    assert code == 2 and err.count("\n") == 1 and message in err and "line 2" in err


def test_a_weight_that_is_no_number_is_refused_before_loading(tmp_path, capsys):
    code, _, err = _run(capsys, "txt2img", _flags(tmp_path) + ["--prompt", "a (cat:1.2.3)", "--prompt-syntax",
                                                                "a1111", "--ckpt", tmp_path / "nothing.ckpt"])
    assert code == 2 and err.count("\n") == 1 and "1.2.3" in err
