"""One APIRouter per resource: exposures, subtractions, health."""
