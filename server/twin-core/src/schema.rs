//! OpenAPI schemas written by hand, for the serde shapes utoipa's derive renders in a form that
//! validators or client generators refuse.
//!
//! An internally tagged enum (`#[serde(tag = "kind")]`) puts the tag beside its variant's fields.
//! The derive renders each variant as `allOf` of the variant's type and a separate `{kind}`
//! object: nothing satisfies that when the type forbids unknown fields (the type's half refuses
//! `kind`), and openapi-python-client refuses `allOf` as a member of a union. Here each variant
//! becomes a named object component that lists the tag among its own properties (a one-value
//! enum), with a flattened type's fields merged in, and the enum a `oneOf` of those components
//! with the tag as discriminator. Pure schema: nothing here touches how values serialise.

use utoipa::ToSchema;
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{
    AllOfBuilder, Discriminator, Object, ObjectBuilder, OneOfBuilder, Ref, Schema, Type,
};

/// What [`ToSchema::schemas`] collects: component names and their schemas.
pub type Schemas = Vec<(String, RefOr<Schema>)>;

const COMPONENTS: &str = "#/components/schemas/";

/// One variant of an internally tagged enum: the tag's value, the component name its branch gets,
/// and its type's schema with the components that schema refers to.
pub struct TaggedVariant {
    tag: &'static str,
    component: String,
    schema: RefOr<Schema>,
    refers_to: Schemas,
}

impl TaggedVariant {
    /// Variant `tag`, whose fields are those of `T`, as component `component`.
    pub fn of<T: ToSchema>(tag: &'static str, component: &str) -> Self {
        let mut refers_to = Vec::new();
        T::schemas(&mut refers_to);
        TaggedVariant {
            tag,
            component: component.to_owned(),
            schema: T::schema(),
            refers_to,
        }
    }

    /// The branch's component: `T`'s fields (a flattened type's merged in) with the tag first.
    fn branch(&self, tag_field: &str) -> RefOr<Schema> {
        let tag = ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some([self.tag]))
            .description(Some(format!("Always `{}` here.", self.tag)))
            .build();
        match flattened(&self.schema, &self.refers_to) {
            Some(mut object) => {
                let fields = std::mem::take(&mut object.properties);
                object.properties.insert(tag_field.to_owned(), tag.into());
                object.properties.extend(fields);
                object.required.retain(|f| f != tag_field);
                object.required.insert(0, tag_field.to_owned());
                RefOr::T(Schema::Object(object))
            }
            // A shape this does not know how to merge: the derive's rendering, which
            // `twin-server/tests/api.rs` refuses (a branch must list the tag itself).
            None => AllOfBuilder::new()
                .item(self.schema.clone())
                .item(
                    ObjectBuilder::new()
                        .property(tag_field, tag)
                        .required(tag_field),
                )
                .into(),
        }
    }
}

/// `schema` as one object: itself when it is one, or the merge of an `allOf` of objects and
/// references to objects (how the derive renders `#[serde(flatten)]`). `None` for anything else.
fn flattened(schema: &RefOr<Schema>, components: &Schemas) -> Option<Object> {
    match schema {
        RefOr::T(Schema::Object(object)) => Some(object.clone()),
        RefOr::T(Schema::AllOf(all)) => {
            let mut merged = ObjectBuilder::new()
                .schema_type(Type::Object)
                .description(all.description.clone())
                .build();
            for part in &all.items {
                let part = flattened(part, components)?;
                merged.properties.extend(part.properties);
                merged.required.extend(part.required);
                if merged.description.is_none() {
                    merged.description = part.description;
                }
            }
            Some(merged)
        }
        RefOr::Ref(reference) => {
            let name = reference.ref_location.strip_prefix(COMPONENTS)?;
            let (_, target) = components.iter().find(|(n, _)| n == name)?;
            flattened(target, components)
        }
        _ => None,
    }
}

/// The schema of an internally tagged enum: a `oneOf` of its variants' components, with
/// `tag_field` as the discriminator.
pub fn tagged_union(
    tag_field: &str,
    description: &str,
    variants: &[TaggedVariant],
) -> RefOr<Schema> {
    let mapping = variants
        .iter()
        .map(|v| (v.tag, format!("{COMPONENTS}{}", v.component)));
    let mut union = OneOfBuilder::new()
        .description(Some(description))
        .discriminator(Some(Discriminator::with_mapping(tag_field, mapping)));
    for v in variants {
        union = union.item(Ref::from_schema_name(v.component.clone()));
    }
    union.into()
}

/// Registers every variant's component and what it refers to (see [`ToSchema::schemas`]).
pub fn tagged_union_components(tag_field: &str, variants: Vec<TaggedVariant>, out: &mut Schemas) {
    for v in variants {
        out.push((v.component.clone(), v.branch(tag_field)));
        out.extend(v.refers_to);
    }
}

/// Implements `utoipa::ToSchema` for an internally tagged enum on `kind` whose variants are named
/// after [`JobKind`](crate::JobKind)s: `Variant(PayloadType) = "ComponentName"`, one per variant.
/// A variant left out fails to compile (the match below is exhaustive).
macro_rules! kind_tagged_schema {
    ($enum:ident, $description:literal, $($kind:ident($payload:ty) = $component:literal,)*) => {
        impl $enum {
            fn schema_variants() -> Vec<$crate::schema::TaggedVariant> {
                vec![$($crate::schema::TaggedVariant::of::<$payload>(
                    $crate::spec::JobKind::$kind.as_str(),
                    $component,
                ),)*]
            }
        }

        const _: fn(&$enum) = |value| match value {
            $($enum::$kind(_) => {})*
        };

        impl utoipa::PartialSchema for $enum {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                $crate::schema::tagged_union("kind", $description, &$enum::schema_variants())
            }
        }

        impl utoipa::ToSchema for $enum {
            fn schemas(schemas: &mut $crate::schema::Schemas) {
                $crate::schema::tagged_union_components("kind", $enum::schema_variants(), schemas);
            }
        }
    };
}

pub(crate) use kind_tagged_schema;
