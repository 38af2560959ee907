"""Post-processing (sliding windows, instance, panoptic) and metrics (mIoU, PQ)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vitkit.tasks.metrics import SemanticMetrics, panoptic_quality
from vitkit.tasks.postprocess import (
    instance_predictions,
    panoptic_predictions,
    semantic_inference,
    semantic_probs,
    window_starts,
)


class EchoSegmenter(nn.Module):
    """One query whose mask logits are the input itself: its semantic score is sigmoid(x) * p(class)."""

    img_size = (32, 48)

    def forward(self, x):
        assert tuple(x.shape[-2:]) == self.img_size, "windows must have the model's size"
        classes = torch.tensor([[[2.0, 0.5, -1.0]]]).expand(x.shape[0], 1, 3)
        return [x[:, :1]], [classes]


@pytest.mark.parametrize("hw", [(32, 48), (100, 70), (20, 30), (33, 200)])
def test_sliding_windows_reassemble_the_frame(hw):
    x = torch.randn(2, 1, *hw)
    out = semantic_inference(EchoSegmenter(), x, overlap=0.3)
    p = torch.tensor([2.0, 0.5, -1.0]).softmax(0)[:2]
    expected = torch.sigmoid(x) * p.view(1, 2, 1, 1)
    assert out.shape == (2, 2, *hw)
    # zero padding enters only outside the frame; overlaps average identical values
    assert torch.allclose(out, expected, atol=1e-6)


def test_window_starts_cover_evenly():
    assert window_starts(100, 100) == [0]
    starts = window_starts(250, 100, 0.25)
    assert starts[0] == 0 and starts[-1] == 150
    assert all(b - a <= 75 for a, b in zip(starts, starts[1:]))


def test_semantic_probs_formula():
    masks = torch.randn(1, 3, 4, 4)
    classes = torch.randn(1, 3, 3)
    got = semantic_probs(masks, classes)
    want = sum(masks[0, q].sigmoid()[None] * classes[0, q].softmax(-1)[:2, None, None] for q in range(3))
    assert torch.allclose(got[0], want, atol=1e-6)


def test_instance_topk_over_query_and_class():
    classes = torch.full((1, 3, 4), -10.0)
    classes[0, 0, 1] = 5.0  # query 0 -> class 1
    classes[0, 2, 0] = 4.0  # query 2 -> class 0
    masks = torch.full((1, 3, 8, 8), -5.0)
    masks[0, 0, :4] = 5.0
    masks[0, 2, 4:] = 5.0
    res = instance_predictions(masks, classes, top_k=2)[0]
    assert res["labels"].tolist() == [1, 0]
    assert res["masks"][0, :4].all() and not res["masks"][0, 4:].any()
    assert res["scores"][0] > res["scores"][1] > 0.5


def test_panoptic_merge():
    classes = torch.full((1, 3, 3), -10.0)
    classes[0, 0, 0] = 10.0
    classes[0, 1, 1] = 10.0
    classes[0, 2, 2] = 10.0  # no-object query
    masks = torch.full((1, 3, 8, 8), -10.0)
    masks[0, 0, :, :4] = 10.0
    masks[0, 1, :, 4:] = 10.0
    masks[0, 2] = 10.0
    res = panoptic_predictions(masks, classes)[0]
    assert set(res["segments"].unique().tolist()) == {0, 1}
    assert (res["classes"][:, :4] == 0).all() and (res["classes"][:, 4:] == 1).all()


def test_semantic_metrics_numbers():
    m = SemanticMetrics(2)
    target = torch.tensor([[0, 0, 1, 1]])
    pred = torch.tensor([[0, 1, 1, 1]])
    m.update(pred, target)
    r = m.compute()
    assert r["iou"] == pytest.approx([1 / 2, 2 / 3])
    assert r["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert r["dice"][1] == pytest.approx(4 / 5)
    assert r["accuracy"] == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="differ in shape"):
        m.update(pred, target[:, :2])


def test_panoptic_quality():
    gt_seg = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]])
    gt_cls = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]])
    assert panoptic_quality(gt_seg, gt_cls, gt_seg, gt_cls, 2)["pq"] == pytest.approx(1.0)
    pred_seg = torch.tensor([[0, 0, 0, 1], [0, 0, 1, 1]])  # segment 0 IoU 4/5, segment 1 IoU 3/4
    res = panoptic_quality(pred_seg, gt_cls.clone().masked_fill(pred_seg == 0, 0).masked_fill(pred_seg == 1, 1),
                           gt_seg, gt_cls, 2)
    assert res["pq"] == pytest.approx((4 / 5 + 3 / 4) / 2)
    assert res["tp"] == 2 and res["fp"] == 0 and res["fn"] == 0


def test_hydra_target_instantiation():
    hydra = pytest.importorskip("hydra")
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"_target_": "vitkit.EoMT", "patch_size": 14, "embed_dim": 32, "depth": 2,
                            "num_heads": 4, "mlp_ratio": 4.0, "num_register_tokens": 4, "ffn_layer": "mlp",
                            "img_size": [56, 56], "num_classes": 2, "num_q": 3, "num_blocks": 1,
                            "pretrained": False, "drop_path_rate": 0.0})
    model = hydra.utils.instantiate(cfg)
    assert model.num_q == 3 and model.encoder.config.img_size == (56, 56)
    cfg2 = OmegaConf.create({"_target_": "vitkit.EoMT", "backbone": "dinov3_vits16", "embed_dim": 64, "depth": 2,
                             "num_heads": 4, "num_classes": 2, "num_q": 3, "num_blocks": 1, "img_size": [64, 64],
                             "in_chans": 1, "mask_stride": 2})
    model2 = hydra.utils.instantiate(cfg2).eval()
    with torch.no_grad():
        assert model2(torch.randn(1, 1, 64, 64))[0][-1].shape == (1, 3, 32, 32)
