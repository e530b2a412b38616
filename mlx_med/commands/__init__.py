"""One module per CLI verb; ``mlx_med.cli`` registers every ``command``/``commands`` found here."""
