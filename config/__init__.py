"""The experiment file: typed settings (``settings``), YAML loading, validation and the grid (``schema``)."""
