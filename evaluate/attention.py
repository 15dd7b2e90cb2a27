"""`refine-eval attention`: where a policy looks on the frame while it writes its action and its
rationale (ReFineVLA's attention visualisation).

The policy decodes as in evaluation (`decoding.generate`, constrained greedy, on the frame
resized with `resize_image`), then its decoding is replayed with eager attention and
`output_attentions`: one forward pass over the prompt (the image included) that fills the KV
cache, one over the generated tokens on that cache — the same two kinds of step `generate` took,
so the attention is the attention that produced the text (PaliGemma's bidirectional prefix and
a generated token that happens to be an image-token id included, which one teacher-forced pass
over prompt + text would handle differently).

Decisions:

- The query rows of a generated token are those that *produced* it: the row of the token before
  it (HF generate's per-step attention). Action map: the rows that produced the 7 action tokens;
  rationale map: the rows that produced the rationale tokens. The `ACTION:` tag belongs to
  neither, and with `reasoning=False` (or an action-only checkpoint) there is no rationale map.
- Key columns: the image tokens of the prompt (`config.image_token_id`). If they come in several
  runs (Idefics3 with image splitting: the tiles, then the global view) the last run, the whole
  frame, is used, so the map lines up with the frame.
- Attention probabilities are averaged over heads, then over the chosen decoder layers, then over
  the query rows, restricted to the image columns and normalised to sum 1 — so a row or head that
  barely looks at the image weighs little. The share of the rows' attention that lands on the
  image at all (before normalising) is kept as `*_image_share`.
- The patch grid is the image-token count reshaped to the checkpoint's image aspect (square for
  PaliGemma and Idefics3: 256 tokens -> 16x16; Idefics3's pixel shuffle is already in the count).
- The overlay is drawn on the frame as given: `resize` stretches the whole frame (no crop), so
  patch (i, j) covers the same part of the original frame as of the resized one.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..train.policy import ACTION_TAG, N_ACTION, find_tag, generate, resize_image
from .errors import EvalError
from .policy import torch_device

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from ..train.policy import Policy

ALPHA = 0.5  # weight of the colour-mapped attention over the frame
COLORMAP = "jet"
TEXT_LIMIT = 300  # characters of the rationale printed under the panels


@dataclass(frozen=True)
class AttentionMaps:
    """What the policy wrote and where its tokens looked, as (gh, gw) maps over the patch grid."""

    instruction: str
    rationale: str  # decoded rationale ("" when none was written)
    action: np.ndarray  # (7,) unnormalised action
    forced_tag: bool  # the rationale budget ran out and `ACTION:` was forced
    action_map: np.ndarray  # (gh, gw) float64, >= 0, sums to 1
    rationale_map: np.ndarray | None  # same, or None when no rationale token was written
    action_image_share: float  # mean share of the action rows' attention that lands on the image
    rationale_image_share: float | None
    layers: tuple[int, ...]  # decoder layers averaged, as non-negative indices
    num_layers: int  # decoder layers the model has
    grid: tuple[int, int]  # (gh, gw) patch grid of the image tokens
    prompt_ids: tuple[int, ...]  # the prompt as the model read it (image tokens expanded)
    generated_ids: tuple[int, ...]  # rationale + tag + 7 action ids (no EOS)
    rationale_tokens: int  # how many of generated_ids are rationale


def resolve_layers(layers: Sequence[int] | None, num_layers: int) -> tuple[int, ...]:
    """Decoder layer indices (negative from the top) as sorted non-negative ones; None: all."""
    if layers is None:
        return tuple(range(num_layers))
    if not layers:
        raise EvalError("--layers: choose at least one decoder layer")
    bad = [i for i in layers if not -num_layers <= i < num_layers]
    if bad:
        raise EvalError(
            f"--layers {','.join(map(str, bad))}: out of range, the model has {num_layers} decoder layers "
            f"(0..{num_layers - 1}, or -{num_layers}..-1 from the top)"
        )
    return tuple(sorted({i % num_layers for i in layers}))


def patch_grid(count: int, image_size: tuple[int, int]) -> tuple[int, int]:
    """(gh, gw) with gh * gw == count and gh / gw the image's aspect; EvalError if there is none."""
    h, w = image_size
    gw = max(1, round((count * w / h) ** 0.5))
    gh = count // gw
    if gh * gw != count:
        raise EvalError(f"{count} image tokens do not form a patch grid of a {h}x{w} image")
    return gh, gw


def image_positions(prompt_ids: Sequence[int], image_token_id: int) -> list[int]:
    """Positions of the image tokens the map covers: the last contiguous run of `image_token_id`
    (the only one, or Idefics3's global view after its tiles)."""
    runs: list[list[int]] = []
    for i, token in enumerate(prompt_ids):
        if token != image_token_id:
            continue
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs[-1] if runs else []


def attention_maps(
    policy: Policy,
    image: np.ndarray,
    instruction: str,
    layers: Sequence[int] | None = None,
    reasoning: bool = True,
    max_rationale_tokens: int = 64,
) -> AttentionMaps:
    """Decode `instruction` on `image` (any size: resized as in evaluation) and map the attention
    of the action rows and the rationale rows to the image patches (see the module docstring).

    `layers`: decoder layer indices to average (negative from the top); None: all. An action-only
    checkpoint is never asked for a rationale, as in `RefinePolicy`.
    """
    num_layers = len(policy.adapter.decoder_layers(policy.model))
    chosen = resolve_layers(layers, num_layers)
    token_id = _image_token_id(policy)
    if reasoning and not policy.info.get("reasoning", True):
        reasoning = False
    size = (int(policy.info["image_size"][0]), int(policy.info["image_size"][1]))
    frame = resize_image(np.asarray(image), size)

    recorder = _RecordingPolicy(policy)
    gen = generate(recorder, [frame], [instruction], reasoning, max_rationale_tokens)[0]
    inputs = {k: v for k, v in recorder.model.inputs.items() if hasattr(v, "shape")}
    prompt = inputs["input_ids"][0].tolist()
    generated = recorder.model.output[0, len(prompt) : len(prompt) + gen.new_tokens].tolist()
    if generated[-N_ACTION:] != gen.action_ids:  # the recording must be the decoding it reports
        raise EvalError(f"{policy.path}: the replayed tokens do not end in the decoded action ids")

    columns = image_positions(prompt, token_id)
    if not columns:
        raise EvalError(f"{policy.path}: the prompt holds no image token (id {token_id}); cannot map attention")
    grid = patch_grid(len(columns), size)
    rows = _image_attention(policy, inputs, generated, columns, chosen)  # (len(generated), image tokens)

    n_rationale = _rationale_tokens(policy, generated, reasoning)
    action_map, action_share = _grid_map(rows[-N_ACTION:], grid)
    rationale_map, rationale_share = _grid_map(rows[:n_rationale], grid) if n_rationale else (None, None)
    return AttentionMaps(
        instruction=instruction,
        rationale=gen.rationale,
        action=gen.action,
        forced_tag=gen.forced_tag,
        action_map=action_map,
        rationale_map=rationale_map,
        action_image_share=action_share,
        rationale_image_share=rationale_share,
        layers=chosen,
        num_layers=num_layers,
        grid=grid,
        prompt_ids=tuple(prompt),
        generated_ids=tuple(generated),
        rationale_tokens=n_rationale,
    )


def write_attention(maps: AttentionMaps, frame: np.ndarray, out_png: Path) -> Path:
    """PNG: the frame, then each map bilinearly upsampled to the frame, colour-mapped and blended
    over it (colours span 0..each map's own maximum), titled with the instruction and layers, the
    tokens each map comes from, the share of their attention on the image and the top patch's
    weight beside a uniform map's; the rationale (cleaned, cut at 300 characters) underneath."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figure_class = _figure_class()
    frame = np.asarray(frame, dtype=np.uint8)
    panels: list[tuple[str, np.ndarray]] = [("frame", frame)]
    title = _panel_title("action", N_ACTION, maps.action_image_share, maps.action_map)
    panels.append((title, overlay(frame, maps.action_map)))
    if maps.rationale_map is not None and maps.rationale_image_share is not None:
        title = _panel_title("rationale", maps.rationale_tokens, maps.rationale_image_share, maps.rationale_map)
        panels.append((title, overlay(frame, maps.rationale_map)))

    fig = figure_class(figsize=(3.6 * len(panels), 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (title, picture) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        _show(ax, picture, title)
    layers = f"decoder layers {','.join(map(str, maps.layers))} of {maps.num_layers}"
    if len(maps.layers) == maps.num_layers:
        layers = f"all {maps.num_layers} decoder layers"
    fig.suptitle(f"{_printable(maps.instruction)}  ({layers}, heads averaged)", parse_math=False)
    text = _printable(maps.rationale)
    if text:
        text = text if len(text) <= TEXT_LIMIT else text[: TEXT_LIMIT - 1] + "…"
        fig.supxlabel(f"rationale: {text}", fontsize="small", wrap=True, parse_math=False)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100, format="png")
    return out_png


def overlay(frame: np.ndarray, grid_map: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """(H, W, 3) uint8: `grid_map` upsampled bilinearly to the frame, scaled to its maximum,
    colour-mapped and blended over the frame with weight `alpha`."""
    from matplotlib import colormaps
    from PIL import Image

    h, w = frame.shape[:2]
    up = np.asarray(Image.fromarray(grid_map.astype(np.float32), mode="F").resize((w, h), Image.Resampling.BILINEAR))
    peak = float(up.max())
    colours = colormaps[COLORMAP](up / peak if peak > 0 else up)[..., :3] * 255.0
    return np.clip((1 - alpha) * frame[..., :3] + alpha * colours, 0, 255).astype(np.uint8)


def read_frame(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file, or one EvalError line naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (OSError, UnidentifiedImageError) as exc:
        reason = "no such file" if isinstance(exc, FileNotFoundError) else str(exc)
        raise EvalError(f"--image {path}: cannot read the image ({reason})") from None


def run_attention(
    policy_dir: Path,
    image_path: Path,
    instruction: str,
    out: Path,
    layers: list[int] | None = None,
    reasoning: bool = True,
    device: str | None = None,
    max_rationale_tokens: int = 64,
    trust_remote_code: bool = False,
) -> AttentionMaps:
    """`refine-eval attention`: load the checkpoint, map the attention on the frame, write the PNG.

    The image is read before the model is loaded, so a bad path fails at once. `device`: None picks
    cuda when available.
    """
    from ..train.policy import Policy

    frame = read_frame(image_path)
    policy = Policy(policy_dir, device=torch_device(device), trust_remote_code=trust_remote_code)
    maps = attention_maps(policy, frame, instruction, layers, reasoning, max_rationale_tokens)
    write_attention(maps, frame, out)
    return maps


# --- the replay --------------------------------------------------------------------------------


class _RecordingModel:
    """Stands in for the policy's model during `generate`, keeping the exact inputs it was given
    and the ids it returned: `Generated` holds the decoded rationale only, and text need not
    re-tokenise to the ids the model wrote."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.inputs: dict[str, Any] = {}
        self.output: Any = None

    def generate(self, **kwargs: Any) -> Any:
        self.inputs = kwargs
        self.output = self.model.generate(**kwargs)
        return self.output


class _RecordingPolicy:
    """The policy, with its model's `generate` recorded (everything else read through)."""

    def __init__(self, policy: Policy) -> None:
        self._policy = policy
        self.model = _RecordingModel(policy.model)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._policy, name)


def _image_token_id(policy: Policy) -> int:
    config = policy.model.config
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    family = policy.info.get("model_family")
    raise EvalError(
        f"{policy.path}: cannot locate the image tokens of a {family} model (its config has no image_token_id)"
    )


def _rationale_tokens(policy: Policy, generated: Sequence[int], reasoning: bool) -> int:
    if not reasoning:  # the tag is in the prompt; the model wrote the 7 action ids only
        return 0
    tag = policy.adapter.tokenizer(policy.processor)(ACTION_TAG, add_special_tokens=False)["input_ids"]
    return max(find_tag(generated, tag), 0)


@contextmanager
def _eager_attention(model: Any) -> Iterator[None]:
    """Eager attention for the replay (sdpa and flash kernels return no weights), then back."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def _image_attention(
    policy: Policy, inputs: dict[str, Any], generated: list[int], columns: list[int], layers: tuple[int, ...]
) -> np.ndarray:
    """(len(generated), len(columns)): for each generated token, the attention to the image
    columns of the row that produced it, averaged over heads and `layers`."""
    import torch

    model = policy.model
    prompt_len = int(inputs["input_ids"].shape[1])
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    chunk = torch.tensor([generated[:-1]], device=policy.device)  # the last token produces only EOS
    suffix = policy.adapter.text_inputs([prompt_len], prompt_len + chunk.shape[1])
    suffix = {k: v[:, prompt_len:].to(policy.device) for k, v in suffix.items()}
    mask = torch.ones((1, prompt_len + chunk.shape[1]), dtype=torch.long, device=policy.device)
    with _eager_attention(model), torch.no_grad():
        first = model(**inputs, use_cache=True, output_attentions=True)
        rest = model(
            input_ids=chunk,
            attention_mask=mask,
            **suffix,
            **{cache_arg: getattr(first, cache_arg)},
            use_cache=True,
            output_attentions=True,
        )
    if not first.attentions or not rest.attentions:
        family = policy.info.get("model_family")
        raise EvalError(
            f"{policy.path}: the {family} model returned no attention weights (eager attention unsupported?)"
        )
    index = torch.tensor(columns, device=policy.device)
    per_layer = []
    for layer in layers:  # (heads, rows, keys) -> (rows, image columns), heads averaged
        head = first.attentions[layer][0, :, -1:, :].index_select(-1, index)
        tail = rest.attentions[layer][0].index_select(-1, index)
        per_layer.append(torch.cat([head, tail], dim=1).float().mean(dim=0))
    return torch.stack(per_layer).mean(dim=0).cpu().double().numpy()


def _grid_map(rows: np.ndarray, grid: tuple[int, int]) -> tuple[np.ndarray, float]:
    """Mean over the query rows, normalised to sum 1 over the image; and the mean share on it."""
    mean = rows.mean(axis=0)
    share = float(mean.sum())
    if not share > 0:
        raise EvalError("the chosen rows put no attention on the image tokens; cannot normalise the map")
    return (mean / share).reshape(grid), share


# --- the figure --------------------------------------------------------------------------------


def _figure_class() -> Any:
    """matplotlib's Figure, imported here so `refine-eval --help` stays instant (drawn on an Agg
    canvas, not through pyplot, so the process's backend and figure registry are left alone)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise EvalError("the attention figure needs matplotlib: pip install matplotlib") from None
    return Figure


def _panel_title(tokens: str, count: int, share: float, grid_map: np.ndarray) -> str:
    """Which rows, how much of their attention is on the image, and how peaked the map is (the
    colours span 0..the map's maximum, so a flat map reads as one colour)."""
    return (
        f"{tokens} tokens ({count})\n{share:.0%} of their attention on the image\n"
        f"top patch {grid_map.max():.1%} (uniform {1 / grid_map.size:.1%})"
    )


def _show(ax: Axes, picture: np.ndarray, title: str) -> None:
    ax.imshow(picture, interpolation="nearest")
    ax.set_title(title, fontsize="medium")
    ax.set_axis_off()


def _printable(text: str) -> str:
    """One line without control characters (a policy's rationale may hold any token)."""
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())
