"""How a sweep is launched beyond ``sweep.py`` itself: the secrets a launch creates for Ray and MLflow."""
