"""Image-text retrieval metrics: BLIP's `itm_eval` recall@1/5/10 in both directions and their means."""
from __future__ import annotations

import numpy as np


def recall_at_k(scores_i2t, scores_t2i, txt2img, img2txt) -> dict:
    """BLIP's itm_eval: scores_i2t (n_img, n_txt), scores_t2i (n_txt, n_img); img2txt[i] = the caption
    indices of image i, txt2img[t] = the image of caption t. Ranks by numpy argsort descending, as the
    official code. Returns percentages txt_r1/5/10, img_r1/5/10, their means and r_mean."""
    scores_i2t, scores_t2i = np.asarray(scores_i2t), np.asarray(scores_t2i)
    ranks = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        inds = np.argsort(score)[::-1]
        ranks[index] = min(np.where(inds == i)[0][0] for i in img2txt[index])
    tr = [100.0 * np.mean(ranks < k) for k in (1, 5, 10)]
    ranks = np.zeros(scores_t2i.shape[0])
    for index, score in enumerate(scores_t2i):
        inds = np.argsort(score)[::-1]
        ranks[index] = np.where(inds == txt2img[index])[0][0]
    ir = [100.0 * np.mean(ranks < k) for k in (1, 5, 10)]
    tr_mean, ir_mean = sum(tr) / 3, sum(ir) / 3
    out = {"txt_r1": tr[0], "txt_r5": tr[1], "txt_r10": tr[2], "txt_r_mean": tr_mean,
           "img_r1": ir[0], "img_r5": ir[1], "img_r10": ir[2], "img_r_mean": ir_mean, "r_mean": (tr_mean + ir_mean) / 2}
    return {k: float(v) for k, v in out.items()}
