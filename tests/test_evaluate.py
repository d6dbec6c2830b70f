"""The evaluation protocol (click rule, invariants, COCO AP, COCO reading) and its command."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from sam_jax import evaluate as command
from sam_jax.modeling.prompt_encoder import BACKGROUND, FOREGROUND, PADDING
from sam_jax.train import demo_data, eval_data, evaluate

pytestmark = pytest.mark.usefixtures("fast_compiles")


def square(h, w, top, left, side):
  m = np.zeros((h, w), bool)
  m[top:top + side, left:left + side] = True
  return m


# --- the click rule ----------------------------------------------------------

def test_first_click_is_the_unique_centre_of_a_square():
  m = square(20, 20, 2, 3, 5)  # rows 2..6, cols 3..7: the centre (x 5, y 4) is 3 from outside
  np.testing.assert_array_equal(evaluate.interior_point(m), [5, 4])


def test_the_image_border_counts_as_the_boundary():
  m = np.zeros((9, 12), bool)
  m[:5, :5] = True  # the top-left corner
  # Without the zero padding the corner pixel would be the deepest (5 from the mask's
  # inner edges); with it, the centre is, 3 from every side.
  np.testing.assert_array_equal(evaluate.interior_point(m), [2, 2])


def test_next_click_goes_to_the_deeper_error_region():
  gt = square(30, 30, 2, 2, 9) | square(30, 30, 20, 20, 3)
  pred = square(30, 30, 2, 2, 9)  # misses the small square: a positive click at its centre
  xy, label = evaluate.next_click(pred, gt)
  np.testing.assert_array_equal(xy, [21, 21])
  assert label == FOREGROUND
  pred = gt | square(30, 30, 15, 2, 7)  # a false positive 7 wide: a negative click inside it
  xy, label = evaluate.next_click(pred, gt)
  np.testing.assert_array_equal(xy, [5, 18])
  assert label == BACKGROUND
  # Both error regions 3 wide: the tie goes negative, as in RITM.
  xy, label = evaluate.next_click(square(30, 30, 2, 2, 9) | square(30, 30, 2, 20, 3), gt)
  assert label == BACKGROUND and tuple(xy) == (21, 3)
  assert evaluate.next_click(gt, gt) == (None, PADDING)


# --- invariants with stand-in predictors -------------------------------------

class Dataset:
  """Items of demo shapes at two image sizes, some with one mask."""

  def __init__(self, n=5, seed=0):
    rng = np.random.default_rng(seed)
    self.items = []
    for i in range(n):
      size = 48 if i % 2 else 40
      image, masks = demo_data.make_example(rng, size, 4)
      masks = masks[:1] if i == 3 else masks
      self.items.append(dict(image=image, masks=np.stack(masks),
                             boxes=np.stack([evaluate.tight_box(m) for m in masks])))
    self.image_ids = list(range(n))
    self.description = "test shapes"

  def __len__(self):
    return len(self.items)

  def __getitem__(self, i):
    return self.items[i]


class StandIn:
  """A predictor that knows the ground truth: the perfect one, or a noisy one."""

  def __init__(self, dataset, noise=0.0, seed=0):
    self.gt = {it["image"].tobytes(): it["masks"] for it in dataset.items}
    self.noise, self.rng = noise, np.random.default_rng(seed)

  def set_image_batch(self, images):
    self.masks = [self.gt[im.tobytes()] for im in images]

  def decode(self, _, coords, labels, boxes, masks, multimask):
    out = []
    for gt in self.masks:
      m = np.repeat(gt[:, None], 3 if multimask else 1, axis=1)
      if self.noise:
        m = m ^ (self.rng.random(m.shape) < self.noise)
      scores = self.rng.random(m.shape[:2])
      out.append((m, scores, np.zeros((*m.shape[:2], 4, 4), np.float32)))
    return out


def test_a_perfect_predictor_scores_miou_1_and_noc_1():
  data = Dataset()
  stand_in = StandIn(data)
  proto = evaluate.Protocol(images_per_call=2)
  scores = evaluate.run(stand_in, data, proto, decode=stand_in.decode)
  res = evaluate.summarize(scores, proto)
  assert res["num_masks"] == sum(len(it["masks"]) for it in data.items)
  assert res["num_images"] == len(data)
  assert res["miou_1point_default"] == res["miou_1point_oracle"] == res["miou_box"] == 1.0
  assert all(v == 1.0 for v in res["miou_points"].values())
  assert res["noc85"] == res["noc90"] == 1.0


def test_oracle_is_never_below_default_and_noc_is_capped():
  data = Dataset()
  stand_in = StandIn(data, noise=0.3)
  proto = evaluate.Protocol(points=(1, 2, 3), max_clicks=4, images_per_call=3)
  scores = evaluate.run(stand_in, data, proto, [4, 0, 2], decode=stand_in.decode)
  assert np.all(scores["iou_oracle"] >= scores["iou_default"])
  assert (scores["iou_oracle"] > scores["iou_default"]).any()  # the noise makes them differ
  np.testing.assert_array_equal(scores["iou_points"][:, 0], scores["iou_default"])
  assert scores["noc"].max() == 4 and scores["iou_points"].shape[1] == 3
  # In the order asked for, every mask of each image.
  want = [(i, j) for i in (4, 0, 2) for j in range(len(data[i]["masks"]))]
  assert list(zip(scores["image"], scores["mask"])) == want
  res = evaluate.summarize(scores, proto)
  assert res["miou_1point_oracle"] >= res["miou_1point_default"]
  assert res["miou_box"] < 1.0
  # More points than the NoC cap: the curve goes on, NoC stays capped.
  long = evaluate.Protocol(points=(1, 6), max_clicks=2)
  noisy = StandIn(data, noise=0.3)
  scores = evaluate.run(noisy, data, long, decode=noisy.decode)
  assert scores["iou_points"].shape[1] == 6 and scores["noc"].max() <= 2


@pytest.mark.slow
def test_the_model_path_agrees_with_itself_across_batchings():
  """The real predictor: results do not depend on how images are grouped per call."""
  from configs.demo import tiny_model
  from sam_jax.build import build_sam
  from sam_jax.checkpoint import init_params
  from sam_jax.predictor import SamPredictor
  model = build_sam(tiny_model(64))
  predictor = SamPredictor(model, init_params(model, jax.random.key(1)))
  from sam_jax.predictor import TRACE_COUNTS
  data = Dataset(3)
  one = evaluate.run(predictor, data, evaluate.Protocol(points=(1, 2), max_clicks=2,
                                                        images_per_call=1))
  three = evaluate.run(predictor, data, evaluate.Protocol(points=(1, 2), max_clicks=2,
                                                          images_per_call=3))
  for k in one:
    np.testing.assert_allclose(one[k], three[k], atol=1e-6, err_msg=k)
  assert np.all(one["iou_oracle"] >= one["iou_default"])
  # A second evaluation (as training's after its first) compiles nothing new.
  traces = dict(TRACE_COUNTS)
  again = evaluate.run(predictor, data, evaluate.Protocol(points=(1, 2), max_clicks=2,
                                                          images_per_call=3))
  assert dict(TRACE_COUNTS) == traces
  np.testing.assert_array_equal(again["iou_box"], three["iou_box"])


# --- COCO --------------------------------------------------------------------

def coco_files(tmp_path, with_crowd=True):
  """Two images; polygon, compressed RLE, uncompressed RLE and a crowd annotation."""
  images_dir = tmp_path / "images"
  images_dir.mkdir()
  h, w = 40, 50
  masks = {}
  anns = []
  for image_id in (1, 2):
    Image.new("RGB", (w, h), (image_id * 50, 0, 0)).save(images_dir / f"{image_id}.png")
  poly = [10, 5, 30, 5, 30, 25, 10, 25]  # a rectangle x 10..30, y 5..25
  anns.append(dict(id=1, image_id=1, category_id=1, iscrowd=0, segmentation=[poly],
                   bbox=[10, 5, 20, 20], area=400))
  m2 = square(h, w, 28, 35, 8)
  rle = mask_utils.encode(np.asfortranarray(m2.astype(np.uint8)))
  anns.append(dict(id=2, image_id=1, category_id=2, iscrowd=0,
                   segmentation=dict(size=[h, w], counts=rle["counts"].decode()),
                   bbox=[35, 28, 8, 8], area=64))
  m3 = square(h, w, 2, 2, 12)
  flat = m3.flatten(order="F").astype(np.uint8)
  runs, cur, n = [], 0, 0
  for v in flat:
    if v != cur:
      runs.append(n)
      cur, n = v, 0
    n += 1
  runs.append(n)
  anns.append(dict(id=3, image_id=2, category_id=1, iscrowd=0,
                   segmentation=dict(size=[h, w], counts=runs), bbox=[2, 2, 12, 12], area=144))
  if with_crowd:
    anns.append(dict(id=4, image_id=2, category_id=1, iscrowd=1,
                     segmentation=dict(size=[h, w], counts=rle["counts"].decode()),
                     bbox=[35, 28, 8, 8], area=64))
  masks = {1: [None, m2], 2: [m3]}
  data = dict(images=[dict(id=i, file_name=f"{i}.png", height=h, width=w) for i in (1, 2)],
              annotations=anns, categories=[dict(id=1, name="a"), dict(id=2, name="b")])
  ann_file = tmp_path / "ann.json"
  ann_file.write_text(json.dumps(data))
  return str(ann_file), str(images_dir), masks


def test_coco_reading_polygons_rle_and_crowds(tmp_path):
  ann_file, images_dir, masks = coco_files(tmp_path)
  data = eval_data.open_dataset(f"coco:{ann_file}:{images_dir}")
  assert len(data) == 2 and data.image_ids == [1, 2]
  first, second = data[0], data[1]
  assert first["image"].shape == (40, 50, 3) and first["image"].dtype == np.uint8
  assert first["masks"].shape == (2, 40, 50)
  poly = np.zeros((40, 50), bool)
  poly[5:26, 10:31] = True  # pycocotools rasterises the polygon's edges inclusively
  assert abs(int(first["masks"][0].sum()) - int(poly.sum())) <= 45
  assert first["masks"][0][10:20, 15:25].all() and not first["masks"][0][30:, :].any()
  np.testing.assert_array_equal(first["masks"][1], masks[1][1])
  np.testing.assert_array_equal(first["boxes"], [[10, 5, 30, 25], [35, 28, 43, 36]])
  # The crowd annotation is skipped; the uncompressed RLE is read.
  assert second["masks"].shape == (1, 40, 50)
  np.testing.assert_array_equal(second["masks"][0], masks[2][0])


def test_coco_mask_ap_is_1_for_the_ground_truth_and_less_otherwise(tmp_path):
  ann_file, _, _ = coco_files(tmp_path, with_crowd=False)
  gt = COCO(ann_file)
  results = []
  for ann in gt.dataset["annotations"]:
    rle = mask_utils.encode(np.asfortranarray(gt.annToMask(ann)))
    rle["counts"] = rle["counts"].decode()
    results.append(dict(image_id=ann["image_id"], category_id=ann["category_id"],
                        segmentation=rle, score=1.0))
  assert evaluate.coco_mask_ap(gt, results, [1, 2])["AP"] == pytest.approx(1.0)
  results[0]["category_id"] = 2  # a wrong class: one miss, one false positive
  assert evaluate.coco_mask_ap(gt, results, [1, 2])["AP"] < 0.9


@pytest.mark.parametrize("spec, groups", [
    ("tfds:segment_anything:train", ("segment_anything", "train", None)),
    ("tfds:segment_anything:train[:-100]:/data", ("segment_anything", "train[:-100]", "/data")),
])
def test_tfds_specs_keep_the_split_slice(monkeypatch, spec, groups):
  from sam_jax.train import data as data_lib
  seen = []
  monkeypatch.setattr(data_lib, "tfds_records", lambda *a: seen.append(a) or ([], {}))
  assert len(eval_data.open_dataset(spec)) == 0
  assert seen == [groups]


def test_seeded_subsampling():
  a = eval_data.subsample(100, 10, seed=3)
  assert a == eval_data.subsample(100, 10, seed=3) == sorted(a) and len(set(a)) == 10
  assert a != eval_data.subsample(100, 10, seed=4)
  assert eval_data.subsample(5, 10) == list(range(5))
  keep = eval_data._pick(20, 4, 0, 7)  # pylint: disable=protected-access
  np.testing.assert_array_equal(keep, eval_data._pick(20, 4, 0, 7))  # pylint: disable=protected-access
  assert len(keep) == 4


# --- the command's errors ----------------------------------------------------

@pytest.mark.parametrize("spec, error, words", [
    ("coco:{tmp}/missing.json:{tmp}", FileNotFoundError, "annotation file"),
    ("coco:{tmp}/bad.json:{tmp}", ValueError, "not a COCO instance-segmentation file"),
    ("coco:{tmp}/bad.json", ValueError, "coco:ANN.json:IMAGES_DIR"),
    ("{tmp}/nowhere", FileNotFoundError, "does not exist"),
    ("{tmp}/bad.json", ValueError, "is a file, not a dataset"),
    ("{tmp}/empty", FileNotFoundError, r"No NAME.jpg \+ NAME.json pairs"),
    ("tfds:only_a_name", ValueError, "tfds:NAME:SPLIT"),
])
def test_clear_errors_for_bad_data(tmp_path, spec, error, words):
  (tmp_path / "bad.json").write_text(json.dumps(dict(images=[])))
  (tmp_path / "empty").mkdir()
  with pytest.raises(error, match=words):
    command.main(["--checkpoint", "random:vit_b", "--data", spec.format(tmp=tmp_path),
                  "--output", str(tmp_path / "out")])


def test_clear_errors_for_an_empty_dataset_a_missing_checkpoint_and_bad_boxes(tmp_path):
  empty = tmp_path / "empty.json"
  empty.write_text(json.dumps(dict(images=[], annotations=[], categories=[])))
  out = str(tmp_path / "out")
  with pytest.raises(ValueError, match="has no images to evaluate"):
    command.main(["--checkpoint", "random:vit_b", "--data", f"coco:{empty}:{tmp_path}",
                  "--output", out])
  ann_file, images_dir, _ = coco_files(tmp_path)
  coco = f"coco:{ann_file}:{images_dir}"
  with pytest.raises(FileNotFoundError, match="checkpoint .*nowhere does not exist"):
    command.main(["--checkpoint", str(tmp_path / "nowhere"), "--data", coco, "--output", out])
  (tmp_path / "dets.json").write_text(json.dumps([dict(image_id=1, bbox=[0, 0, 1, 1])]))
  with pytest.raises(ValueError, match="COCO results format"):
    command.main(["--checkpoint", "random:vit_b", "--data", coco, "--output", out,
                  "--boxes", str(tmp_path / "dets.json")])
  os.makedirs(out)
  open(os.path.join(out, command.RESULTS), "w").close()
  with pytest.raises(FileExistsError, match="--overwrite"):
    command.main(["--checkpoint", "random:vit_b", "--data", coco, "--output", out])


@pytest.mark.slow
def test_the_command_end_to_end(tmp_path, capsys):
  """Two checkpoints on COCO and on an SA-1B-layout folder: one table, one plot, mask AP."""
  from configs.demo import tiny_model
  from sam_jax.build import build_sam
  from sam_jax.checkpoint import init_params, save_sam
  for seed in (0, 1):
    cfg = tiny_model(64)
    save_sam(str(tmp_path / f"ckpt{seed}"), cfg, init_params(build_sam(cfg), jax.random.key(seed)))
  folder = tmp_path / "sa1b"
  demo_data.write_dataset(str(folder), 3, 48, 3)
  ann_file, images_dir, _ = coco_files(tmp_path, with_crowd=False)
  dets = [dict(image_id=1, category_id=1, bbox=[10, 5, 20, 20], score=0.9),
          dict(image_id=2, category_id=1, bbox=[2, 2, 12, 12], score=0.8)]
  (tmp_path / "dets.json").write_text(json.dumps(dets))
  out = tmp_path / "out"
  result = command.main([
      "--checkpoint", str(tmp_path / "ckpt0"), str(tmp_path / "ckpt1"),
      "--data", f"coco:{ann_file}:{images_dir}", str(folder), "--boxes",
      str(tmp_path / "dets.json"), "-", "--points", "1,2,3", "--max_clicks", "3",
      "--max_images", "2", "--output", str(out)])
  text = capsys.readouterr().out
  assert (out / command.PLOT).stat().st_size > 0
  saved = json.loads((out / command.RESULTS).read_text())
  assert saved == json.loads(json.dumps(result))
  assert saved["protocol"]["points"] == [1, 2, 3] and saved["protocol"]["max_images"] == 2
  assert len(saved["runs"]) == 4
  for r in saved["runs"]:
    m = r["metrics"]
    assert r["dataset"]["evaluated_images"] == 2 and m["num_masks"] > 0
    assert m["miou_1point_oracle"] >= m["miou_1point_default"]
    assert 1 <= m["noc85"] <= 3 and set(m["miou_points"]) == {"1", "2", "3"}
    assert ("mask_ap" in r) == r["dataset"]["spec"].startswith("coco:")
    assert r["checkpoint_label"] in text and "NoC90" in text
