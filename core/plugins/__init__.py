"""Plugin discovery and resolution: the entry-point registry, name -> class/factory resolution with one-line
errors, and the layered config build (which needs the method plugin for its optimiser defaults)."""
