"""The replica's HTTP surface: the FastAPI app, TGI/LoRAX, OpenAI and admin routes, request
validation, the serving state (admission, generation flow) and metrics."""
