"""FROMAGe: a frozen language model grounded to images (Koh, Salakhutdinov, Fried 2023)."""
