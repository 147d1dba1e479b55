"""Data: text (load, tokenize, pack) and images (decode on the CPU, views on the device),
the bundled corpora, tokenizer training, and the micro-batch stream the trainer reads."""

from __future__ import annotations


def build_data(cfg, objective_cls, tokenizer, log=print):
    """The run's data for an objective class, by its ``modality``: :class:`~lmssl.data.batches.TextData`,
    :class:`~lmssl.data.images.ImageData` (with the objective's views drawn per sample) or, for
    ``image_text``, :class:`~lmssl.data.pairs.PairData` (image-caption pairs, views likewise)."""
    from lmssl.errors import UserError

    if objective_cls.modality == "text":
        from lmssl.data.batches import build_text_data

        return build_text_data(cfg, tokenizer, log)
    if objective_cls.modality == "images":
        from lmssl.data.images import build_image_data

        return build_image_data(cfg, log, views=objective_cls.make_views(cfg))
    if objective_cls.modality == "image_text":
        from lmssl.data.pairs import build_pair_data

        make_views = getattr(objective_cls, "make_views", None)  # None: the pairs carry no view parameters
        return build_pair_data(cfg, tokenizer, log, views=make_views(cfg) if make_views is not None else None)
    raise UserError(f"objective '{cfg.objective}' reads {objective_cls.modality} data, which this lmssl cannot load yet")
