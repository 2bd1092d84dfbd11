"""Pseudo-masks (stages `pseudo_labels`, `eval_pseudo`, `eval_crf`, `eval_irn`) from seeds, CRF or IRN maps."""
