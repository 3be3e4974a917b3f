//! `client classes`: the tenant's taxonomy as a tree (parents, then their children), with
//! example counts and the live head.

use serde::Serialize;
use taxon_proto::v1::{ClassInfo, ListClassesRequest};

use crate::error::Result;
use crate::output;
use crate::{Ctx, Outcome};

#[derive(Serialize)]
struct Entry<'a> {
    name: &'a str,
    parent: &'a str,
    examples: u32,
    is_parent: bool,
}

pub async fn run(ctx: &mut Ctx<'_>) -> Result<Outcome> {
    let conn = ctx.connect().await?;
    let list = conn
        .classifier()
        .list_classes(ListClassesRequest {})
        .await
        .map_err(conn.rpc_error("ListClasses"))?
        .into_inner();
    let ordered = tree_order(&list.classes);
    if ctx.json {
        let entries: Vec<Entry> = ordered
            .iter()
            .map(|(_, c)| Entry {
                name: &c.name,
                parent: &c.parent,
                examples: c.examples,
                is_parent: c.is_parent,
            })
            .collect();
        output::json_line(ctx.out, &entries)?;
        return Ok(Outcome::Success);
    }
    if ordered.is_empty() {
        writeln!(
            ctx.out,
            "no classes yet: enroll one with `client enroll --class NAME PHOTOS`"
        )?;
    } else {
        let rows: Vec<Vec<String>> = ordered
            .iter()
            .map(|(depth, c)| {
                vec![
                    format!("{}{}", "  ".repeat(*depth), c.name),
                    c.examples.to_string(),
                ]
            })
            .collect();
        output::table(ctx.out, &["class", "examples"], &[1], &rows)?;
    }
    writeln!(
        ctx.out,
        "head: {} v{}{}",
        if list.head.is_empty() {
            "none"
        } else {
            &list.head
        },
        list.head_version,
        if list.model.is_empty() {
            String::new()
        } else {
            format!(", model {}", list.model)
        }
    )?;
    Ok(Outcome::Success)
}

/// Top-level classes sorted by name, each followed by its children (depth 1), also sorted.
/// A child whose parent is missing from the list still shows, at the top level.
pub(crate) fn tree_order(classes: &[ClassInfo]) -> Vec<(usize, &ClassInfo)> {
    let mut sorted: Vec<&ClassInfo> = classes.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let known = |name: &str| sorted.iter().any(|c| c.name == name);
    let mut out = Vec::new();
    for top in sorted
        .iter()
        .filter(|c| c.parent.is_empty() || !known(&c.parent))
    {
        out.push((0, *top));
        for child in sorted.iter().filter(|c| c.parent == top.name) {
            out.push((1, *child));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(name: &str, parent: &str, examples: u32) -> ClassInfo {
        ClassInfo {
            name: name.into(),
            parent: parent.into(),
            examples,
            is_parent: parent.is_empty(),
        }
    }

    #[test]
    fn children_follow_their_parent() {
        let classes = vec![
            class("teapot", "kitchenware", 5),
            class("toys", "", 3),
            class("kitchenware", "", 12),
            class("mymug", "kitchenware", 7),
            class("orphan", "gone", 1),
        ];
        let order: Vec<(usize, &str)> = tree_order(&classes)
            .into_iter()
            .map(|(d, c)| (d, c.name.as_str()))
            .collect();
        assert_eq!(
            order,
            vec![
                (0, "kitchenware"),
                (1, "mymug"),
                (1, "teapot"),
                (0, "orphan"),
                (0, "toys")
            ]
        );
    }

    #[test]
    fn json_entries_have_name_parent_examples() {
        let c = class("mymug", "kitchenware", 7);
        let v = serde_json::to_value(vec![Entry {
            name: &c.name,
            parent: &c.parent,
            examples: c.examples,
            is_parent: c.is_parent,
        }])
        .unwrap();
        assert_eq!(v[0]["name"], "mymug");
        assert_eq!(v[0]["parent"], "kitchenware");
        assert_eq!(v[0]["examples"], 7);
    }
}
