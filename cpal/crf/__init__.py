"""Dense CRF refinement (stage `refine_crf`): the CRF itself and the stage that applies it to seed maps."""
