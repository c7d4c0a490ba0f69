//! The balancer's moves as the book applies them: a release takes only free units, a grant
//! serves the wait queue, and a move id applied twice answers as it did the first time.

use super::*;

impl Book {
    fn apply_move(
        &mut self,
        kind: MoveKind,
        move_id: Uuid,
        product: &str,
        units: u32,
    ) -> Result<Result<AppliedMove, MoveResponse>, MoveRefusal> {
        if let Some(m) = self.moves.get(&move_id) {
            if m.kind != kind || m.product != product {
                return Err(MoveRefusal::Conflict);
            }
            return Ok(Err(m.response.clone()));
        }
        let p = self
            .products
            .get_mut(product)
            .ok_or(MoveRefusal::UnknownProduct)?;
        let moved = match kind {
            MoveKind::Release => releasable(
                p.allocation,
                p.in_use.saturating_add(p.reserved_idle()),
                units,
            ),
            MoveKind::Grant => units.min(u32::MAX - p.allocation),
            MoveKind::Retire => units.min(p.allocation),
        };
        match kind {
            MoveKind::Release | MoveKind::Retire => p.allocation -= moved,
            MoveKind::Grant => p.allocation += moved,
        }
        p.generation += 1;
        let applied = AppliedMove {
            kind,
            product: product.to_owned(),
            requested: units,
            response: MoveResponse {
                move_id,
                units: moved,
                allocation: p.allocation,
                generation: p.generation,
            },
        };
        self.moves.insert(move_id, applied.clone());
        Ok(Ok(applied))
    }

    /// A release from the balancer: takes only free units, at most `units`. A repeated move id
    /// returns the first answer and changes nothing.
    pub fn release(
        &mut self,
        move_id: Uuid,
        product: &str,
        units: u32,
    ) -> Result<MoveOutcome, MoveRefusal> {
        self.take_back(MoveKind::Release, move_id, product, units)
    }

    /// A retirement from the balancer (an expired entitlement): takes `units` out of the
    /// allocation, free or not, at most the whole allocation. Checkouts in use stay; with fewer
    /// units than in use the server grants nothing new until enough are checked in, so no new
    /// checkout goes beyond the estate's new total. Idempotent by move id.
    pub fn retire(
        &mut self,
        move_id: Uuid,
        product: &str,
        units: u32,
    ) -> Result<MoveOutcome, MoveRefusal> {
        self.take_back(MoveKind::Retire, move_id, product, units)
    }

    /// A release or a retirement: units leave the allocation and nobody is served.
    fn take_back(
        &mut self,
        kind: MoveKind,
        move_id: Uuid,
        product: &str,
        units: u32,
    ) -> Result<MoveOutcome, MoveRefusal> {
        Ok(match self.apply_move(kind, move_id, product, units)? {
            Ok(applied) => MoveOutcome {
                response: applied.response.clone(),
                applied: Some(applied),
                served: Vec::new(),
            },
            Err(response) => MoveOutcome {
                response,
                applied: None,
                served: Vec::new(),
            },
        })
    }

    /// A grant from the balancer: adds units and serves waiters. Idempotent by move id.
    pub fn grant(
        &mut self,
        move_id: Uuid,
        product: &str,
        units: u32,
        now: Millis,
        handles: &mut impl FnMut() -> Handle,
    ) -> Result<MoveOutcome, MoveRefusal> {
        Ok(
            match self.apply_move(MoveKind::Grant, move_id, product, units)? {
                Ok(applied) => MoveOutcome {
                    response: applied.response.clone(),
                    applied: Some(applied),
                    served: self.serve(product, now, handles),
                },
                Err(response) => MoveOutcome {
                    response,
                    applied: None,
                    served: Vec::new(),
                },
            },
        )
    }

    /// Whether a move id has been applied (its answer, if so).
    pub fn applied_move(&self, move_id: Uuid) -> Option<&AppliedMove> {
        self.moves.get(&move_id)
    }
}
