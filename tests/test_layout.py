"""The code layout the README promises: thin stage shells, the triplet convention in one module."""
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_stage_modules_stay_thin_shells():
  """Measuring, sampling and rendering live in the library; a stage module wires config to it (<= 400 lines)."""
  sizes = {p.name: len(p.read_text().splitlines()) for p in sorted((ROOT / "pipelines").glob("*.py"))}
  assert sizes and all(n <= 400 for n in sizes.values()), sizes


def test_every_library_folder_says_what_lives_there():
  for init in sorted((ROOT / "alignet_data").glob("*/__init__.py")):
    text = init.read_text().strip()
    assert text.startswith('"""') and len(text) > 40, f"{init} needs a docstring naming what lives there"
