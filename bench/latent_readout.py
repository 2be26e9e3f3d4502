"""python bench/latent_readout.py RUN [--samples 500]

Does a latent student's imitation of the teacher's slots carry the answer? For a finished latent
run (stage 2 `--latent M` with a K/V loss, each teacher layer taught by one student layer; keys
taught before RoPE are rotated at their slots' positions), over the first samples of its cache,
the teacher that wrote the cache reads its answer (teacher-forced, as
`stage1_extract.slot_answers` does) after the question's K/V and, in place of its chain of
thought:

- its own M slots, the target of the K/V loss;
- the student's K/V at its M latent positions, through the run's projector into the teacher's
  space: what the K/V loss made of them;
- another sample's projected latents (the one before it): what they give without this problem;
- nothing.

Beside them, the student's own answer after its latents, teacher-forced the same way. The samples
are the run's training problems: this asks what the imitation holds, not how it generalises.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kava_common import KavaError  # noqa: E402

FORMS = ("slots", "latents", "other latents", "none")


def one_to_one(teacher) -> dict[int, int]:
    """{teacher layer index in the cache: student layer} when each stored teacher layer is the
    target of exactly one student layer at weight 1; anything else is refused."""
    got = {}
    for s, row in teacher.distilled:
        if len(row) != 1 or row[0][1] != 1.0:
            raise KavaError(f"student layer {s} is taught a mix of teacher layers {row}: the teacher cannot read it "
                            "back as one layer's K/V")
        got[row[0][0]] = s
    if sorted(got) != list(range(len(teacher.cache.layers))):
        raise KavaError(f"the run teaches teacher layers {sorted(got)} of {len(teacher.cache.layers)}: the teacher's "
                        "answer needs every layer")
    return got


def project(distiller, teacher, pairs: dict, batch: dict) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{teacher layer index: (K, V) (H, n, D)}: the student's K/V at its latent positions
    (`pairs`, {student layer: (K, V)}) through the run's projector, at the sample's n filled slots."""
    n = int(batch["slot_mask"][0].sum())
    got = {}
    for pi, (layer, row) in enumerate(teacher.distilled):
        sk, sv = pairs[layer]
        pk, pv = distiller.proj[0](pi, sk.float(), sv.float())
        got[row[0][0]] = (pk[0, :, :n], pv[0, :, :n])
    return got


def readout(run: Path, samples: int, progress: bool = True) -> dict:
    from safetensors.torch import load_file
    from tqdm.auto import tqdm
    from kava_common.data import pad_id
    from kava_common.rope import rotate
    from stage1_extract.slot_answers import answer_score, answer_scores, cache_teacher, with_question
    from stage2_train.config import load_config, saved_settings
    from stage2_train.latent import _latent_forward, _latent_pairs
    from stage2_train.latent_data import LatentData, collate_latent
    from stage2_train.trainer import Trainer
    final = run / "final"
    with tempfile.TemporaryDirectory() as out:
        saved = saved_settings(run)
        cfg = load_config(None, {**saved, "student": str(final / "student"), "out": out, "device": "cpu",
                                 "progress": False, "resume": None, "report_to": "none"})
        if not cfg.latent:
            raise KavaError(f"{run}: not a latent run")
        tr = Trainer(cfg, echo=lambda *a: None)
    tr.distiller.load_state_dict(load_file(str(final / "projector.safetensors")))
    tr.model.eval()
    tr.distiller.eval()
    t = tr.teachers[0]
    c, layers = t.cache, one_to_one(t)
    teacher, _ = cache_teacher(c.meta, None, torch.device("cpu"))
    data = LatentData(c, tr.tok, *tr.thought_ids, keys=cfg.latent_keys)
    right = {f: 0 for f in FORMS + ("student",)}
    nll = {f: 0.0 for f in FORMS + ("student",)}
    tokens, read, before = 0, 0, None
    n = min(samples, len(c))
    for i in tqdm(range(n), desc="samples", disable=not progress, dynamic_ncols=True):
        s, item = c[i], data[i]
        (r0, r1), (a0, a1) = s["token_segments"]["reasoning"], s["token_segments"]["answer"]
        ids = s["input_ids"]
        if a1 <= a0 or a0 <= r1 or item["suffix"][1:-1] != ids[r1:a1].tolist():
            continue                    # no answer, or the student reads another text than the teacher
        batch = collate_latent([item], pad_id(tr.tok))
        with torch.no_grad():
            out, where, sfx, _ = _latent_forward(tr.model, tr.cap, tr.distiller.latent_head, batch, cfg, tr.device,
                                                 tr.autocast)
            # the student's own answer: suffix [eot, between..., answer..., EOS]; the suffix's logits j
            # predict suffix token j + 1, so answer token a is predicted at a - r1
            exact, _, lp = answer_score(out.logits[0, a0 - r1:a1 - r1], ids[a0:a1])
            right["student"] += exact
            nll["student"] += lp
            projected = project(tr.distiller, t, _latent_pairs(tr.cap, t, where, cfg.latent_keys), batch)
            r = c.rkv(i)
            if cfg.latent_keys == "pre_rope":     # taught the slots' keys un-rotated: turned back where they sat
                projected = {li: (rotate(k, r["index"][li][:, :k.shape[1]], c.meta.rope), v)
                             for li, (k, v) in projected.items()}
            slots = {li: (r["k"][li][:, r["mask"][li][0]], r["v"][li][:, r["mask"][li][0]]) for li in layers}
            pasts = {"slots": slots, "latents": projected, "none": None,
                     "other latents": before if before is not None else projected}
            for form, mid in pasts.items():
                exact, _, lp = answer_scores(teacher, ids, with_question(s["k"], s["v"], r0, mid), r1, a0, a1)
                right[form] += exact
                nll[form] += lp
        before = projected
        tokens += a1 - a0
        read += 1
    if read == 0:
        raise KavaError(f"{run}: none of the first {n} samples could be read back")
    return {"samples": read, "of": n, "latent": cfg.latent,
            "forms": {f: {"exact": right[f] / read, "nll": nll[f] / tokens} for f in right}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[2])
    p.add_argument("run", type=Path, help="a finished latent run folder (RUN/final, RUN/config.yaml)")
    p.add_argument("--samples", type=int, default=500, help="the cache's first N samples")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        res = readout(a.run, a.samples, not a.no_progress)
    except (KavaError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{a.run}: {res['samples']} of the first {res['of']} samples, {res['latent']} latent steps")
    print("| the teacher reads its answer after the question and | answers right | NLL per answer token |")
    print("|---|---|---|")
    names = {"slots": "its own slots (the K/V loss's target)", "latents": "the student's latents, projected",
             "other latents": "another sample's latents, projected", "none": "nothing"}
    for f, r in res["forms"].items():
        name = names.get(f, "(the student itself after its latents)")
        print(f"| {name} | {r['exact']:.3f} | {r['nll']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
