"""Studies that chain several runs into one table (``python -m cl_vit.experiments.<name>``)."""
