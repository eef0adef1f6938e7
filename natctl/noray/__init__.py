"""noray compatibility: games built on noray (netfox for Godot) switch to natctl by changing one address."""
