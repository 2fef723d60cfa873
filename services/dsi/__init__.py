"""The dsi service: DSI++ generative retrieval with continual indexing (Mehta et al. 2023)."""
