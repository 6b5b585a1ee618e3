"""pickrank.inputs.metadata: the prompt each generator stores, on real files (tests/data/generators, from sd-parsers) and on
files made here exactly as each tool writes them (how: in each helper's docstring)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from pickrank.inputs.metadata import (
    FoundPrompt,
    a1111_prompt,
    comfy_prompt,
    decode_user_comment,
    prompt_from_image,
    prompt_from_metadata_dict,
    read_image_metadata,
    workflow_graph,
)

DATA = Path(__file__).parents[1] / "data" / "generators"
ROOT = Path(__file__).resolve().parents[2]

DUCK = "photo of a duck"
DREAM = ("professional full body photo of young woman, hyper long brunette hair, elegant hair, wearing a bikini top "
         "and asymmetric short skirt, curvy body, long legs, (imperfect skin), detailed skin, intense freckles, "
         "super long eye lashes, at night, outside, city background, 8k ultra detailed, realistic, high quality, "
         "film grain, low contrast")


# -- files made as the tools write them ----------------------------------------------------------------------

def png_with_text(path: Path, **text: str) -> Path:
    """A 1x1 PNG with tEXt chunks, as A1111 / ComfyUI / SwarmUI write theirs (PIL PngInfo.add_text)."""
    info = PngImagePlugin.PngInfo()
    for k, v in text.items():
        info.add_text(k, v)
    Image.new("RGB", (1, 1)).save(path, pnginfo=info)
    return path


def piexif_user_comment(text: str, encoding: str = "unicode") -> bytes:
    """The EXIF block A1111 writes into JPEG/WebP: piexif.dump({"Exif": {UserComment: UserComment.dump(text,
    encoding="unicode")}}): big-endian TIFF, IFD0 with only the Exif IFD pointer, the Exif IFD with UserComment
    (UNDEFINED) = b"UNICODE\\0" + UTF-16BE. Byte for byte what piexif writes (compare the real JPEG's below)."""
    value = (b"UNICODE\0" + text.encode("utf_16_be")) if encoding == "unicode" else (b"ASCII\0\0\0" + text.encode())
    ifd0 = struct.pack(">H", 1) + struct.pack(">HHII", 0x8769, 4, 1, 26) + struct.pack(">I", 0)
    exif_ifd = struct.pack(">H", 1) + struct.pack(">HHII", 0x9286, 7, len(value), 40)  # piexif: no next-IFD word
    return b"Exif\0\0" + b"MM\0*" + struct.pack(">I", 8) + ifd0 + exif_ifd + value


def a1111_file(path: Path, text: str, fmt: str) -> Path:
    """A1111 JPEG/WebP: Pillow saves the image, then piexif.insert puts the EXIF block in (modules/images.py)."""
    Image.new("RGB", (1, 1)).save(path, format=fmt, exif=piexif_user_comment(text))
    return path


def fooocus_jpeg(path: Path, parameters: str) -> Path:
    """Fooocus JPEG/WebP (modules/meta_parser.py get_exif): a PIL Exif with 0x9286 UserComment = the JSON (in IFD0,
    no charset header), 0x0131 Software = 'Fooocus v...', 0x927C MakerNote = the scheme."""
    exif = Image.Exif()
    exif[0x9286] = parameters
    exif[0x0131] = "Fooocus v2.4.3"
    exif[0x927C] = "fooocus"
    Image.new("RGB", (1, 1)).save(path, format="JPEG", exif=exif)
    return path


def comfyui_webp(path: Path, prompt: dict | None, workflow: dict | None) -> Path:
    """ComfyUI's SaveAnimatedWEBP (comfy_extras/nodes_images.py): metadata = img.getexif(); [0x0110] =
    "prompt:" + json.dumps(prompt); extra_pnginfo keys from 0x010F down ("workflow:" + json.dumps(workflow))."""
    img = Image.new("RGB", (1, 1))
    metadata = img.getexif()
    if prompt is not None:
        metadata[0x0110] = "prompt:{}".format(json.dumps(prompt))
    if workflow is not None:
        metadata[0x010F] = "workflow:{}".format(json.dumps(workflow))
    img.save(path, save_all=True, duration=100, append_images=[], exif=metadata, lossless=False, quality=80,
             method=4)
    return path


def real_text(name: str) -> dict[str, str | bytes]:
    return read_image_metadata(str(DATA / name))


# -- real files ----------------------------------------------------------------------------------------------

REAL = [
    ("automatic1111_cropped.png", DUCK, "automatic1111", "parameters"),
    ("automatic1111_cropped.jpg", DUCK, "automatic1111", "EXIF UserComment"),
    ("sdparsers_text_after_idat.png", DUCK, "automatic1111", "parameters"),
    ("fooocus1_cropped.png", "a smiling goldfish", "fooocus", "parameters"),
    ("invokeai_imeta1.png", "digital artwork, oil painting. painterly brushstrokes, holidays,", "invokeai",
     "invokeai_metadata"),
    ("invokeai_sdmeta1.png", DREAM, "invokeai", "sd-metadata"),
    ("invokeai_dream1.png", DREAM, "invokeai", "Dream"),
    ("novelai1_cropped.png", "masterpiece, best quality,  cat, space, icon", "novelai", "Description"),
    ("img2img_cropped.png", "photograph of victorian woman with wings, sky clouds, meadow grass", "comfyui",
     "prompt graph"),
]


@pytest.mark.parametrize("name, prompt, source, field", REAL, ids=[r[0] for r in REAL])
def test_real_generator_files(name, prompt, source, field):
    assert prompt_from_image(str(DATA / name)) == FoundPrompt(prompt, source, None, field)


def test_fooocus_gives_its_prompt_field_never_the_json():
    found = prompt_from_image(str(DATA / "fooocus1_cropped.png"))
    assert found.prompt == "a smiling goldfish"
    assert "{" not in found.prompt


def test_a1111_jpeg_exif_is_what_piexif_writes():
    """The helper that makes A1111 WebP/JPEG files gives the same bytes as the real A1111 JPEG."""
    real = Image.open(DATA / "automatic1111_cropped.jpg").info["exif"]
    text = decode_user_comment(Image.open(DATA / "automatic1111_cropped.jpg").getexif().get_ifd(0x8769)[0x9286])
    assert piexif_user_comment(text) == real


# -- ComfyUI -------------------------------------------------------------------------------------------------

COMFY_FINAL = {
    # two passes (hires fix), each saved: the final pass's prompt (KSampler 24, positive = node 26)
    "night_evening_day_morning_cropped.png":
        "(best quality) beautiful (HDR:1.2) (realistic:1.2) landscape breathtaking amazing view nature scenery "
        "photograph forest mountains ocean daytime night evening morning, (sky:1.2)",
    "unclip_2pass_cropped.png": "beautiful scenery landscape outdoors mountains",
    "noisy_latents_3_subjects_cropped.png":
        "girl (flat chest:0.9), (fennec ears:1.0)\u00a0 (fox ears:1.0), (messy hair), (highlights), (realistic "
        "starry eyes pupil:1.1), (hoodie), open jacket, running (school uniform)\nsky clouds nature national park "
        "beautiful winter snow scenery HDR landscape\n(sunset)",
    "img2img_cropped.png": "photograph of victorian woman with wings, sky clouds, meadow grass",
}


@pytest.mark.parametrize("name", sorted(COMFY_FINAL))
def test_comfyui_prompt_graph_only_and_workflow_only(tmp_path, name):
    """An API-queued run writes only `prompt` (no extra_pnginfo); the UI adds `workflow`: each alone gives the
    same prompt as both."""
    info = real_text(name)
    both = prompt_from_image(str(DATA / name))
    api_only = prompt_from_image(str(png_with_text(tmp_path / "api.png", prompt=info["prompt"])))
    wf_only = prompt_from_image(str(png_with_text(tmp_path / "wf.png", workflow=info["workflow"])))
    assert both.prompt == api_only.prompt == wf_only.prompt == COMFY_FINAL[name]
    assert (both.source, api_only.source, wf_only.source) == ("comfyui",) * 3
    assert (api_only.field, wf_only.field) == ("prompt graph", "workflow graph")


@pytest.mark.parametrize("which", ["both", "prompt", "workflow"])
def test_comfyui_webp_exif(tmp_path, which):
    info = real_text("img2img_cropped.png")
    api = json.loads(info["prompt"]) if which in ("both", "prompt") else None
    wf = json.loads(info["workflow"]) if which in ("both", "workflow") else None
    found = prompt_from_image(str(comfyui_webp(tmp_path / "c.webp", api, wf)))
    assert found.prompt == COMFY_FINAL["img2img_cropped.png"]
    assert found.source == "comfyui"


def test_comfyui_non_ascii_prompt_in_webp(tmp_path):
    api = json.loads(real_text("img2img_cropped.png")["prompt"])
    api["6"]["inputs"]["text"] = "ein Fuchs im Schnee, 狐"
    found = prompt_from_image(str(comfyui_webp(tmp_path / "c.webp", api, None)))
    assert found.prompt == "ein Fuchs im Schnee, 狐"


def _enc(**inputs) -> dict:
    return {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], **inputs}}


def _graph(positive_nodes: dict, positive: list, sampler: str = "KSampler") -> dict:
    """A txt2img API graph (as ComfyUI's /prompt takes it) around a given positive conditioning."""
    g = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
        "7": _enc(text="blurry, lowres"),
        "3": {"class_type": sampler, "inputs": {"seed": 1, "steps": 20, "cfg": 7.0, "sampler_name": "euler",
                                               "scheduler": "normal", "denoise": 1.0, "model": ["4", 0],
                                               "positive": positive, "negative": ["7", 0],
                                               "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    }
    g.update(positive_nodes)
    return g


def test_comfyui_sdxl_encoder_takes_text_g():
    g = _graph({"6": {"class_type": "CLIPTextEncodeSDXL", "inputs": {
        "width": 1024, "height": 1024, "crop_w": 0, "crop_h": 0, "target_width": 1024, "target_height": 1024,
        "text_g": "a lighthouse at dusk", "text_l": "lighthouse, dusk", "clip": ["4", 1]}}}, ["6", 0])
    assert comfy_prompt(g) == ("a lighthouse at dusk", None)
    g["6"]["inputs"]["text_g"] = ""
    assert comfy_prompt(g) == ("lighthouse, dusk", None)


def test_comfyui_text_from_a_string_node_and_concatenate():
    g = _graph({"6": _enc(text=["10", 0]),
                "10": {"class_type": "StringConcatenate",
                       "inputs": {"string_a": ["11", 0], "string_b": "oil painting", "delimiter": ", "}},
                "11": {"class_type": "PrimitiveStringMultiline", "inputs": {"value": "a red fox"}}}, ["6", 0])
    assert comfy_prompt(g) == ("a red fox, oil painting", None)


def test_comfyui_controlnet_and_combine_follow_the_positive_only():
    g = _graph({"6": _enc(text="a cat"), "12": _enc(text="a dog"),
                "10": {"class_type": "ConditioningCombine",
                       "inputs": {"conditioning_1": ["6", 0], "conditioning_2": ["12", 0]}},
                "11": {"class_type": "ControlNetApplyAdvanced",
                       "inputs": {"positive": ["10", 0], "negative": ["7", 0], "control_net": ["13", 0],
                                  "image": ["14", 0], "strength": 1.0}},
                "13": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "canny.safetensors"}},
                "14": {"class_type": "LoadImage", "inputs": {"image": "edges.png"}}}, ["11", 0])
    assert comfy_prompt(g) == ("a cat, a dog", None)
    g["3"]["inputs"]["positive"] = ["11", 1]  # the ControlNet node's negative output: the negative text
    assert comfy_prompt(g) == ("blurry, lowres", None)


def test_comfyui_flux_sampler_custom_advanced_through_guider():
    g = _graph({}, ["6", 0])
    g["3"] = {"class_type": "SamplerCustomAdvanced",
              "inputs": {"noise": ["20", 0], "guider": ["22", 0], "sampler": ["23", 0], "sigmas": ["24", 0],
                         "latent_image": ["5", 0]}}
    g.update({"20": {"class_type": "RandomNoise", "inputs": {"noise_seed": 1}},
              "21": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["6", 0], "guidance": 3.5}},
              "22": {"class_type": "BasicGuider", "inputs": {"model": ["4", 0], "conditioning": ["21", 0]}},
              "23": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
              "24": {"class_type": "BasicScheduler", "inputs": {"model": ["4", 0], "scheduler": "simple",
                                                                 "steps": 20, "denoise": 1.0}},
              "6": {"class_type": "CLIPTextEncodeFlux",
                    "inputs": {"clip": ["4", 1], "clip_l": "fox", "t5xxl": "a fox in the snow", "guidance": 3.5}}})
    assert comfy_prompt(g) == ("a fox in the snow", None)


def test_comfyui_without_encoder_or_with_computed_text_gives_a_reason():
    g = _graph({"6": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["7", 0]}}}, ["6", 0])
    del g["6"]["inputs"]["conditioning"]
    assert comfy_prompt(g) == (None, "ComfyUI graph has no text encoder reachable from the sampler's positive "
                                     "input")
    g = _graph({"6": _enc(text=["10", 0]), "10": {"class_type": "OllamaGenerate", "inputs": {"model": "llama3"}}},
               ["6", 0])
    prompt, reason = comfy_prompt(g)
    assert prompt is None and "node 10: OllamaGenerate" in reason
    found = prompt_from_metadata_dict({"prompt": json.dumps(g)})
    assert found.prompt is None and found.source == "comfyui" and "OllamaGenerate" in found.reason


def test_comfyui_cycle_and_garbage_do_not_hang_or_raise():
    g = _graph({"6": {"class_type": "ConditioningCombine",
                      "inputs": {"conditioning_1": ["6", 0], "conditioning_2": ["6", 0]}}}, ["6", 0])
    assert comfy_prompt(g)[0] is None
    for junk in ('{"1": {"class_type": 5, "inputs": [1]}}', '{"nodes": [1, {"id": null}], "links": 3}',
                 "[" * 100_000, '{"3": {"class_type": "KSampler", "inputs": {"positive": ["3", 0]}}}'):
        found = prompt_from_metadata_dict({"prompt": junk, "workflow": junk})
        assert found.prompt is None and found.reason


def test_workflow_muted_bypassed_reroute_and_linked_widget():
    """UI graph details: a muted SaveImage is no output, a Reroute passes through, a text widget turned into a
    linked input takes the linked node's value, not the stale widget value."""
    wf = {"nodes": [
        {"id": 6, "type": "CLIPTextEncode", "mode": 0, "inputs": [{"name": "clip", "type": "CLIP", "link": 1},
                                                                {"name": "text", "type": "STRING", "link": 5,
                                                                 "widget": {"name": "text"}}],
         "widgets_values": ["stale text"]},
        {"id": 10, "type": "PrimitiveNode", "mode": 0, "outputs": [{"links": [5]}], "widgets_values": ["a swan"]},
        {"id": 11, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": 2}]},
        {"id": 3, "type": "KSampler", "mode": 0, "inputs": [{"name": "positive", "link": 3},
                                                           {"name": "latent_image", "link": 4}],
         "widgets_values": [1, "fixed", 20, 7, "euler", "normal", 1]},
        {"id": 5, "type": "EmptyLatentImage", "mode": 0, "widgets_values": [512, 512, 1]},
        {"id": 8, "type": "VAEDecode", "mode": 0, "inputs": [{"name": "samples", "link": 6}]},
        {"id": 9, "type": "SaveImage", "mode": 0, "inputs": [{"name": "images", "link": 7}]},
        {"id": 12, "type": "SaveImage", "mode": 2, "inputs": [{"name": "images", "link": 8}]},
        {"id": 4, "type": "CheckpointLoaderSimple", "mode": 0, "widgets_values": ["x.safetensors"]}],
        "links": [[1, 4, 1, 6, 0, "CLIP"], [2, 6, 0, 11, 0, "CONDITIONING"], [3, 11, 0, 3, 1, "CONDITIONING"],
                  [4, 5, 0, 3, 3, "LATENT"], [5, 10, 0, 6, 1, "STRING"], [6, 3, 0, 8, 0, "LATENT"],
                  [7, 8, 0, 9, 0, "IMAGE"], [8, 8, 0, 12, 0, "IMAGE"]]}
    assert comfy_prompt(workflow_graph(wf)) == ("a swan", None)
    found = prompt_from_metadata_dict({"workflow": json.dumps(wf)})
    assert found == FoundPrompt("a swan", "comfyui", None, "workflow graph")


# -- Automatic1111 / Forge / SD.Next in JPEG and WebP ---------------------------------------------------------

A1111_TEXT = ("a café at night, 夜\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, "
              "CFG scale: 7, Seed: 1, Size: 512x512, Model: sdxl, Version: f2.0.1v1.10.1")


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_a1111_exif_user_comment_utf16(tmp_path, fmt):
    path = a1111_file(tmp_path / f"a.{fmt.lower()}", A1111_TEXT, fmt)
    assert prompt_from_image(str(path)) == FoundPrompt("a café at night, 夜", "automatic1111", None,
                                                       "EXIF UserComment")


def test_a1111_webp_from_the_real_jpeg_exif(tmp_path):
    """The real A1111 JPEG's EXIF block put into a WebP, as piexif.insert does for A1111's WebP output."""
    exif = Image.open(DATA / "automatic1111_cropped.jpg").info["exif"]
    Image.new("RGB", (1, 1)).save(tmp_path / "a.webp", exif=exif)
    assert prompt_from_image(str(tmp_path / "a.webp")).prompt == DUCK


@pytest.mark.parametrize("raw, text", [
    (b"UNICODE\0" + "héllo 夜".encode("utf_16_be"), "héllo 夜"),
    (b"UNICODE\0" + "héllo".encode("utf_16_le"), "héllo"),  # exiftool in a little-endian EXIF
    (b"UNICODE\0" + "héllo 夜".encode("utf-16"), "héllo 夜"),  # with a BOM
    (b"ASCII\0\0\0hello\0", "hello"),
    (b"\0" * 8 + "héllo".encode(), "héllo"),  # undefined
    ("plain string".encode(), "plain string"),  # no header (Fooocus via PIL)
    ("already text", "already text"),
])
def test_decode_user_comment(raw, text):
    assert decode_user_comment(raw) == text


def test_fooocus_jpeg(tmp_path):
    params = real_text("fooocus1_cropped.png")["parameters"]
    found = prompt_from_image(str(fooocus_jpeg(tmp_path / "f.jpg", params)))
    assert found == FoundPrompt("a smiling goldfish", "fooocus", None, "EXIF UserComment")


@pytest.mark.parametrize("text, prompt, has_params", [
    ("a cat\nNegative prompt: dog\nSteps: 20, Sampler: Euler", "a cat", True),
    ("a cat\non two lines\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1", "a cat\non two lines", True),
    ("a cat, style: anime, mood: calm, light: soft", "a cat, style: anime, mood: calm, light: soft", False),
    ("only a prompt", "only a prompt", False),
    ("\nNegative prompt: x\nSteps: 1, Sampler: a, Seed: 2", "", True),
])
def test_a1111_prompt_rules(text, prompt, has_params):
    assert a1111_prompt(text) == (prompt, has_params)


# -- SwarmUI, NovelAI, InvokeAI variants, plain text -----------------------------------------------------------

def test_swarmui_png(tmp_path):
    """SwarmUI (Image metadata, T2IParamInput): `parameters` = JSON {"sui_image_params": {...}, "sui_extra_data"}."""
    doc = {"sui_image_params": {"prompt": "a snowy owl, <lora:owl:0.8>", "negativeprompt": "blurry",
                                "model": "OfficialStableDiffusion/sd_xl_base_1.0", "seed": 1, "steps": 20,
                                "cfgscale": 7, "width": 1024, "height": 1024, "swarm_version": "0.9.2.1"},
           "sui_extra_data": {"date": "2024-08-01", "generation_time": "0.01 (prep) and 3.10 (gen) seconds"}}
    path = png_with_text(tmp_path / "s.png", parameters=json.dumps(doc, indent=2))
    assert prompt_from_image(str(path)) == FoundPrompt("a snowy owl, <lora:owl:0.8>", "swarmui", None,
                                                       "parameters")


def test_novelai_prompt_in_comment_when_description_is_empty():
    comment = json.dumps({"prompt": "a cat in space", "uc": "lowres", "sampler": "k_euler", "steps": 28})
    found = prompt_from_metadata_dict({"Software": "NovelAI", "Description": "", "Comment": comment})
    assert found == FoundPrompt("a cat in space", "novelai", None, "Comment")


def test_sd_metadata_blend_and_string_prompt():
    doc = {"image": {"prompt": [{"prompt": "a cat [ugly]", "weight": 0.7}, {"prompt": "a tiger", "weight": 0.3}]}}
    assert prompt_from_metadata_dict({"sd-metadata": json.dumps(doc)}).prompt == "a cat, a tiger"
    doc = {"image": {"prompt": "a cat [ugly, blurry], in a hat"}}
    assert prompt_from_metadata_dict({"sd-metadata": json.dumps(doc)}).prompt == "a cat, in a hat"


def test_plain_description_is_a_text_prompt():
    assert prompt_from_metadata_dict({"Description": "a bowl of fruit"}) == FoundPrompt(
        "a bowl of fruit", "text", None, "Description")


def test_fmt_restricts_the_format():
    info = real_text("invokeai_sdmeta1.png")
    assert prompt_from_metadata_dict(info, "invokeai").prompt == DREAM
    assert prompt_from_metadata_dict(info, "comfyui") == FoundPrompt(None, None, "no comfyui metadata")
    assert prompt_from_metadata_dict(real_text("fooocus1_cropped.png"), "automatic1111").prompt is None


# -- no prompt: a reason, never a JSON document -----------------------------------------------------------------

@pytest.mark.parametrize("info, reason", [
    ({}, "no generation metadata"),
    ({"Software": "GIMP 2.10", "Comment": "Created with GIMP"}, "no known generator's metadata"),
    ({"parameters": '{"foo": 1, "prompt": "x"}'}, "parameters holds a JSON document of an unknown format"),
    ({"parameters": "[1, 2]"}, "parameters holds a JSON document of an unknown format"),
    ({"prompt": '{"a": {"b": 1}}'}, "no known generator's metadata"),
    ({"Description": '{"prompt": "x"}'}, "no known generator's metadata"),
    ({"invokeai_metadata": '{"positive_prompt": {"a": 1}}'}, "invokeai_metadata has no positive_prompt"),
    ({"parameters": '{"metadata_scheme": "fooocus", "prompt": "{\\"a\\": 1}"}'}, "Fooocus metadata has no prompt"),
])
def test_no_prompt_gives_a_reason_never_json(info, reason):
    found = prompt_from_metadata_dict(info)
    assert found.prompt is None
    assert found.reason.startswith(reason)


def test_unknown_and_empty_files(tmp_path):
    Image.new("RGB", (2, 2)).save(tmp_path / "plain.png")
    assert prompt_from_image(str(tmp_path / "plain.png")) == FoundPrompt(None, None, "no generation metadata")
    Image.new("RGB", (2, 2)).save(tmp_path / "plain.jpg")
    assert prompt_from_image(str(tmp_path / "plain.jpg")) == FoundPrompt(None, None, "no generation metadata")
    png_with_text(tmp_path / "gimp.png", Software="GIMP", Comment='{"json": true}')
    assert prompt_from_image(str(tmp_path / "gimp.png")).prompt is None
    (tmp_path / "notes.png").write_text("not an image")
    assert prompt_from_image(str(tmp_path / "notes.png")).reason == "unreadable: not an image (unrecognised format)"


# -- guarded reads: FIFO, limits ------------------------------------------------------------------------------

def test_fifo_is_refused_without_hanging(tmp_path):
    """In a child process with a timeout: a plain open() of a FIFO would block forever."""
    fifo = tmp_path / "a.png"
    os.mkfifo(fifo)
    code = f"from pickrank.inputs.metadata import prompt_from_image as p; print(p({str(fifo)!r}).reason)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert out.stdout.strip() == "unreadable: not a regular file (a FIFO)", out.stderr


def test_over_the_limits_gives_a_reason(tmp_path):
    path = a1111_file(tmp_path / "a.jpg", A1111_TEXT, "JPEG")
    assert prompt_from_image(str(path), max_bytes=100).reason.startswith("unreadable: too large: ")
    big = png_with_text(tmp_path / "big.png", parameters=A1111_TEXT)
    Image.new("RGB", (300, 200)).save(big, pnginfo=PngImagePlugin.PngInfo())
    assert prompt_from_image(str(big), max_pixels=1000).reason.startswith("unreadable: too large to decode safely")
    assert prompt_from_image(str(DATA / "automatic1111_cropped.png"), max_pixels=1, max_bytes=300).prompt == DUCK


def test_no_pixel_is_decoded(tmp_path, monkeypatch):
    """A bomb-sized image declared in a valid header is refused before decoding: loading is never called."""
    from PIL import ImageFile, WebPImagePlugin

    calls = []
    for cls in (ImageFile.ImageFile, WebPImagePlugin.WebPImageFile):
        monkeypatch.setattr(cls, "load", lambda self: calls.append(1))
    for name, *_ in REAL:
        prompt_from_image(str(DATA / name))
    assert prompt_from_image(str(a1111_file(tmp_path / "a.webp", A1111_TEXT, "WEBP"))).prompt
    assert not calls


def test_broken_exif_keeps_the_file_readable(tmp_path):
    """A JPEG whose EXIF block is cut short: no prompt from it, and no 'unreadable' either."""
    exif = piexif_user_comment(A1111_TEXT)[:30]
    Image.new("RGB", (1, 1)).save(tmp_path / "b.jpg", exif=exif)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing on stderr either
        found = prompt_from_image(str(tmp_path / "b.jpg"))
    assert found.prompt is None and not found.reason.startswith("unreadable")
