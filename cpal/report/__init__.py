"""Report and experiments (stage `report`, console script `cpal-compare`): tables, figures, DVC experiment tables."""
