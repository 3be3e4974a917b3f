//! List, remove, rename and train: the taxonomy and heads managed from the cached embeddings
//! alone, never the photos. The first three work from the store even before any
//! feature-server has answered; only train needs the model identity.

use super::{Caller, ClassList, ClassSummary, Core, Removed, Trained};
use crate::heads::HeadKind;
use crate::taxonomy::{Taxonomy, class_name};
use crate::{Error, Result};

impl Core {
    /// The tenant's classes. Before any feature-server has answered the taxonomy is read from
    /// the store, and only the live head (which needs the model identity) is left out.
    pub async fn list(&self, caller: &Caller) -> Result<ClassList> {
        self.admit(caller)?;
        let Some((tenant, model)) = self.loaded_tenant(&caller.tenant).await? else {
            let name = caller.tenant.clone();
            let snapshot = self
                .blocking("list", move |store| store.snapshot(&name, None))
                .await?;
            return Ok(ClassList {
                classes: summaries(&snapshot.taxonomy),
                ..ClassList::default()
            });
        };
        Ok(ClassList {
            classes: summaries(&tenant.current().taxonomy),
            head: self.live(&tenant, &model.id),
            model: Some(model.id.clone()),
        })
    }

    /// Removes a class with its examples (and its children when `recursive`).
    pub async fn remove(&self, caller: &Caller, name: &str, recursive: bool) -> Result<Removed> {
        self.admit(caller)?;
        let loaded = self.loaded_tenant(&caller.tenant).await?;
        let (t, class) = (caller.tenant.clone(), class_name(name)?);
        let outcome = self
            .blocking("remove", move |store| {
                store.remove_class(&t, &class, recursive)
            })
            .await?;
        tracing::info!(tenant = %caller.tenant, removed = ?outcome.removed_classes, examples = outcome.removed_examples, "removed");
        let mut head = None;
        if let Some((tenant, model)) = loaded {
            // The live head masks removed classes at once; retrain so it also forgets them.
            self.written(&tenant, &model.id, true).await?;
            head = self.live(&tenant, &model.id);
        }
        Ok(Removed {
            classes: outcome.removed_classes,
            examples: outcome.removed_examples,
            head,
        })
    }

    /// Renames a class; examples and heads refer to its id, so nothing is retrained. Returns
    /// the head answering after it.
    pub async fn rename(
        &self,
        caller: &Caller,
        name: &str,
        new_name: &str,
    ) -> Result<Option<super::HeadRef>> {
        self.admit(caller)?;
        let loaded = self.loaded_tenant(&caller.tenant).await?;
        let (old, new) = (class_name(name)?, class_name(new_name)?);
        let (t, o, n) = (caller.tenant.clone(), old.clone(), new.clone());
        self.blocking("rename", move |store| store.rename_class(&t, &o, &n))
            .await?;
        tracing::info!(tenant = %caller.tenant, from = %old, to = %new, "renamed");
        let Some((tenant, model)) = loaded else {
            return Ok(None);
        };
        self.written(&tenant, &model.id, false).await?;
        Ok(self.live(&tenant, &model.id))
    }

    /// Trains a head of `kind` (the default kind when `None`) now, and makes it live. With
    /// `from_scratch` it is not warm-started from the previous head of its kind.
    pub async fn train(
        &self,
        caller: &Caller,
        kind: Option<HeadKind>,
        from_scratch: bool,
    ) -> Result<Trained> {
        self.admit(caller)?;
        let model = self.model()?;
        let tenant = self.tenant(&caller.tenant, &model).await?;
        let kind = self.kind_or_default(kind);
        let head = self
            .trainer
            .train(&tenant, &model.id, kind, from_scratch)
            .await?;
        Ok(Trained {
            kind,
            version: head.meta.version,
            train_ms: head.meta.train_ms,
            classes: count(head.meta.classes.len())?,
            examples: count(head.meta.examples)?,
        })
    }
}

fn summaries(tax: &Taxonomy) -> Vec<ClassSummary> {
    let mut classes: Vec<ClassSummary> = tax
        .classes
        .values()
        .map(|c| ClassSummary {
            name: c.name.clone(),
            parent: tax.parent_of(c.id).map(str::to_string),
            examples: tax.examples_under(c.id),
            is_parent: tax.is_parent(c.id),
        })
        .collect();
    classes.sort_by(|a, b| (&a.parent, &a.name).cmp(&(&b.parent, &b.name)));
    classes
}

fn count(n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| Error::Corrupt(format!("{n} is more than a head can hold")))
}
